"""Prometheus HTTP API side of tests/ops/e2e_prometheus.sh.

    python3 tests/ops/e2e_prometheus.py <command> [args]

    queries              lines 'where<TAB>expr': every dashboard query, its
                         Grafana variables substituted as in check.sh, and
                         every recorded series of recording.yml
    scraped URL          exit 0 once Prometheus at URL has scraped relaygate
    verdicts URL         for every query, a line 'verdict<TAB>where<TAB>expr';
                         verdict is "ok" or why not (no data, NaN only, an error)
    rules-health URL     exit 0 if Prometheus loaded every rule group of
                         recording.yml and alerts.yml and none is in error
    exported URL         exit 0 if every relaygate_* name Prometheus scraped
                         from the demo is in the metric contract (and so in
                         docs/metrics.md, which check.sh holds to it)

Run from the repository root; standard library and PyYAML only (through
ops_checks). A query "returns data" when its result is non-empty and holds
at least one sample that is not NaN: histogram_quantile over buckets that saw
nothing is NaN, which Grafana draws as nothing.
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ops_checks  # noqa: E402

TIMEOUT = 5  # seconds per HTTP request


def queries():
    """(where, expr) for every dashboard query and every recorded series."""
    _, exprs = ops_checks.dashboard_exprs()
    out = [(where, " ".join(ops_checks.substitute(expr).split())) for where, expr in exprs]
    for group in ops_checks.load(ops_checks.RECORDING)["groups"]:
        out += [(f"rule {r['record']}", r["record"]) for r in group["rules"] if "record" in r]
    return out


def get(url, path, **params):
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=TIMEOUT) as resp:
        return json.load(resp)


def verdict(url, expr):
    try:
        body = get(url, "/api/v1/query", query=expr)
    except urllib.error.HTTPError as e:
        try:
            return f"error: {json.load(e).get('error', e)}"
        except ValueError:
            return f"error: {e}"
    except (OSError, ValueError) as e:
        return f"request failed: {e}"
    if body.get("status") != "success":
        return f"error: {body.get('error')}"
    data = body["data"]
    if data["resultType"] == "scalar":
        values = [data["result"][1]]
    else:
        values = [s["value"][1] for s in data["result"]]
    if not values:
        return "no data"
    if all(v == "NaN" for v in values):
        return "NaN only"
    return "ok"


def cmd_queries():
    for where, expr in queries():
        print(f"{where}\t{expr}")
    return 0


def cmd_scraped(url):
    try:
        result = get(url, "/api/v1/query", query='up{job="relaygate"} == 1')["data"]["result"]
    except (OSError, ValueError, KeyError):
        return 1
    return 0 if result else 1


def cmd_verdicts(url):
    for where, expr in queries():
        print(f"{verdict(url, expr)}\t{where}\t{expr}")
    return 0


def cmd_rules_health(url):
    want = [g["name"] for f in (ops_checks.RECORDING, ops_checks.ALERTS) for g in ops_checks.load(f)["groups"]]
    try:
        groups = get(url, "/api/v1/rules")["data"]["groups"]
    except (OSError, ValueError, KeyError) as e:
        print(f"/api/v1/rules: {e}")
        return 1
    errors = [f"rule group {name} not loaded" for name in sorted(set(want) - {g["name"] for g in groups})]
    errors += [f"{r['name']}: {r.get('lastError')}" for g in groups for r in g["rules"] if r.get("health") == "err"]
    return ops_checks.fail(errors)


def cmd_exported(url):
    try:
        names = get(url, "/api/v1/label/__name__/values", **{"match[]": '{job="relaygate"}'})["data"]
    except (OSError, ValueError, KeyError) as e:
        print(f"/api/v1/label/__name__/values: {e}")
        return 1
    exported = {n for n in names if n.startswith("relaygate_")}
    errors = [f"{n} is exported but not in the metric contract (tests/ops/ops_checks.py, docs/metrics.md)"
              for n in sorted(exported - ops_checks.CONTRACT)]
    if not errors:
        print(f"{len(exported)} relaygate_* names exported, all in the contract")
    return ops_checks.fail(errors)


COMMANDS = {
    "queries": cmd_queries,
    "scraped": cmd_scraped,
    "verdicts": cmd_verdicts,
    "rules-health": cmd_rules_health,
    "exported": cmd_exported,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [args]")
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
