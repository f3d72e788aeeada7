"""Checks of the ops pack that no upstream tool does; run by tests/ops/check.sh.

    python3 tests/ops/ops_checks.py <check> [args]

Each check prints what is wrong and exits non-zero, or exits 0. Run from the
repository root. Needs PyYAML (tests/ops/requirements.txt); Python >= 3.11
for tomllib.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ALERTS = Path("deploy/prometheus/alerts.yml")
RECORDING = Path("deploy/prometheus/recording.yml")
ALERT_TESTS = Path("deploy/prometheus/alerts.test.yml")
ALERTMANAGER = Path("deploy/alertmanager/alertmanager.yml")
RUNBOOK = Path("docs/runbook.md")
METRICS_DOC = Path("docs/metrics.md")
DASHBOARD = Path("grafana/dashboards/relaygate.json")
K8S = Path("deploy/k8s")

RUNBOOK_PREFIX = "https://github.com/relaygate/relaygate/blob/main/docs/runbook.md#"
SEVERITY_RECEIVER = {"page": "pagerduty", "ticket": "tickets"}

# The metric contract (issue 5 and the issues it cites). The alert rules and
# the dashboard may only name these; histograms also expose _bucket, _sum
# and _count. docs/metrics.md has a row for each (metrics-documented), and
# tests/ops/e2e_prometheus.sh fails if `relaygate demo` exports a name that
# is not here.
COUNTERS_AND_GAUGES = {
    "relaygate_requests_total",
    "relaygate_in_flight_requests",
    "relaygate_build_info",
    "relaygate_upstream_requests_total",
    "relaygate_tokens_total",
    "relaygate_cost_usd_total",
    "relaygate_usage_estimated_total",
    "relaygate_config_reloads_total",
    "relaygate_failovers_total",
    "relaygate_retries_total",
    "relaygate_hedges_total",
    "relaygate_route_picks_total",
    "relaygate_target_load",
    "relaygate_circuit_state",
    "relaygate_circuit_transitions_total",
    "relaygate_rate_limited_total",
    "relaygate_ratelimit_backend_errors_total",
    "relaygate_ratelimit_fallback_active",
    "relaygate_ledger_dropped_total",
    "relaygate_shadow_requests_total",
    "relaygate_shadow_tokens_total",
    "relaygate_shadow_cost_usd_total",
    "relaygate_shadow_dropped_total",
    "relaygate_client_connections",
    "relaygate_client_timeouts_total",
    "relaygate_cache_requests_total",
    "relaygate_cache_saved_usd_total",
    "relaygate_cache_tokens_served_total",
    "relaygate_cache_entries",
    "relaygate_cache_bytes",
    "relaygate_cache_backend_errors_total",
    # Spend budgets (issue 17, docs/budgets.md).
    "relaygate_budget_spent_usd",
    "relaygate_budget_reserved_usd",
    "relaygate_budget_limit_usd",
    "relaygate_budget_resets_at_seconds",
    "relaygate_budget_rejections_total",
    "relaygate_budget_threshold_crossed_total",
    "relaygate_budget_backend_errors_total",
    "relaygate_budget_fallback_active",
}
HISTOGRAMS = {
    "relaygate_request_duration_seconds",
    "relaygate_upstream_duration_seconds",
    "relaygate_time_to_first_token_seconds",
    "relaygate_inter_token_seconds",
    "relaygate_overhead_seconds",
    "relaygate_ratelimit_queue_wait_seconds",
    "relaygate_shadow_duration_seconds",
    "relaygate_shadow_time_to_first_token_seconds",
}
CONTRACT = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# The config keys relaygate accepts today (unknown keys are rejected).
CONFIG_KEYS = {
    "server": {"listen", "max_body_bytes", "max_response_bytes", "shutdown_grace", "max_in_flight",
               "send_timeout", "request_body_timeout", "header_read_timeout", "keepalive_timeout"},
    "admin": {"key"},
    "upstreams": {"name", "base_url", "api_key", "connect_timeout", "first_byte_timeout",
                  "idle_timeout", "request_timeout", "max_concurrency", "circuit_breaker"},
    "models": {"name", "targets", "price", "hedge_after", "shadow", "cache"},
    "keys": {"name", "key"},
    "retry": {"max_attempts", "base_delay", "max_delay", "budget_ratio", "min_retries_per_second",
              "retry_after_cap"},
    "circuit_breaker": {"consecutive_failures", "failure_rate", "min_requests", "window", "open_for",
                        "max_open_for", "half_open_probes"},
    "rate_limit": {"backend", "redis_url", "fail_mode", "expected_instances", "redis_timeout", "key_prefix",
                   "default_max_tokens"},
    "rate_limits": {"name", "scope", "match", "requests_per_minute", "tokens_per_minute", "burst", "on_limit",
                    "max_queue_wait"},
    "budget": {"backend", "redis_url", "fail_mode", "expected_instances", "redis_timeout"},
    "budgets": {"name", "scope", "match", "usd", "period", "timezone", "on_exceed", "warn_at"},
    "health": {"window", "degraded_below", "unhealthy_below"},
    "ledger": {"path", "capacity"},
    "otel": {"endpoint", "service_name"},
    "cache": {"backend", "redis_url", "redis_timeout", "max_bytes", "max_entry_bytes", "ttl", "scope"},
}
TARGET_KEYS = {"upstream", "model", "priority", "weight"}
PRICE_KEYS = {"input_per_mtok", "output_per_mtok", "cached_input_per_mtok"}
MODEL_CACHE_KEYS = {"ttl", "when"}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def alert_rules():
    return [r for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def recorded_names():
    return {r["record"] for g in load(RECORDING)["groups"] for r in g["rules"] if "record" in r}


def fail(errors):
    for e in errors:
        print(e)
    return 1 if errors else 0


def github_slug(heading):
    """The anchor GitHub gives a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def runbook_anchors():
    anchors = set()
    in_code = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and not in_code:
            anchors.add(github_slug(m.group(2)))
    return anchors


# ---------------------------------------------------------------- checks

def check_alert_annotations():
    """Every alert: a known severity, summary, description, runbook_url."""
    errors = []
    for r in alert_rules():
        name = r["alert"]
        sev = r.get("labels", {}).get("severity")
        if sev not in SEVERITY_RECEIVER:
            errors.append(f"{name}: severity {sev!r} is not one of {sorted(SEVERITY_RECEIVER)}")
        for key in ("summary", "description", "runbook_url"):
            if not r.get("annotations", {}).get(key):
                errors.append(f"{name}: no {key} annotation")
    return fail(errors)


def check_runbook_anchors():
    """Every runbook_url, and every in-page link of the runbook, has a heading."""
    anchors = runbook_anchors()
    errors = []
    for r in alert_rules():
        url = r.get("annotations", {}).get("runbook_url", "")
        if not url.startswith(RUNBOOK_PREFIX):
            errors.append(f"{r['alert']}: runbook_url {url!r} does not start with {RUNBOOK_PREFIX}")
            continue
        anchor = url[len(RUNBOOK_PREFIX):]
        if anchor not in anchors:
            errors.append(f"{r['alert']}: no heading in {RUNBOOK} for #{anchor}")
    for link in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()):
        if link not in anchors:
            errors.append(f"{RUNBOOK}: link to #{link} has no heading")
    print(f"{len(alert_rules())} runbook_url anchors checked against {len(anchors)} headings")
    return fail(errors)


def check_alert_tests_cover():
    """Every alert has a firing and a silent case in alerts.test.yml, and
    group_eval_order lists every group, recording groups first (promtool
    evaluates unlisted groups in random order, which makes tests flaky)."""
    tests = load(ALERT_TESTS)
    firing, silent = set(), set()
    order = tests.get("group_eval_order") or []
    want = [g["name"] for g in load(RECORDING)["groups"]] + [g["name"] for g in load(ALERTS)["groups"]]
    errors = []
    if sorted(order) != sorted(want):
        errors.append(f"{ALERT_TESTS}: group_eval_order {order} does not list exactly the groups {want}")
    recording = {g["name"] for g in load(RECORDING)["groups"]}
    if [g for g in order if g in recording] != order[:len(recording)]:
        errors.append(f"{ALERT_TESTS}: group_eval_order must list the recording groups first")
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    for r in alert_rules():
        if r["alert"] not in firing:
            errors.append(f"{r['alert']}: no test case where it fires")
        if r["alert"] not in silent:
            errors.append(f"{r['alert']}: no test case where it stays silent")
    return fail(errors)


def routes_cases():
    """Lines 'expected_receiver label=value ...' for amtool config routes test."""
    for r in alert_rules():
        sev = r["labels"]["severity"]
        print(f"{SEVERITY_RECEIVER[sev]} alertname={r['alert']} severity={sev}")
    # No severity at all: the root route's receiver, so nothing is dropped.
    print("tickets alertname=SomethingElse")
    return 0


def check_inhibitions():
    """Inhibition rules name alerts that exist."""
    names = {r["alert"] for r in alert_rules()}
    errors = []
    for rule in load(ALERTMANAGER).get("inhibit_rules", []):
        for m in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            mm = re.match(r'^alertname(=~|=)"(.*)"$', m)
            if not mm:
                continue
            op, value = mm.groups()
            wanted = value.split("|") if op == "=~" else [value]
            for w in wanted:
                if w not in names:
                    errors.append(f"inhibit rule matcher {m!r}: no alert {w}")
    # The inhibition: all upstreams down inhibits the per-upstream one.
    if not any('alertname="RelaygateAllUpstreamsOpen"' in r.get("source_matchers", [])
               and 'alertname="RelaygateUpstreamCircuitOpen"' in r.get("target_matchers", [])
               for r in load(ALERTMANAGER).get("inhibit_rules", [])):
        errors.append("no inhibit rule from RelaygateAllUpstreamsOpen to RelaygateUpstreamCircuitOpen")
    return fail(errors)


def dashboard_exprs():
    """(where, expr) for every PromQL query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return dash, out


def substitute(expr):
    """Grafana variables -> values that make the query plain PromQL."""
    fixed = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}

    def repl(m):
        name = m.group(1) or m.group(2)
        return fixed.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def dashboard_rules(out_path):
    """Write every dashboard query as a recording rule, for promtool check rules."""
    dash, exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)]
    Path(out_path).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    print(f"{len(rules)} dashboard queries written to {out_path}")
    return 0 if rules else 1


def check_dashboard():
    """Rows and variables the issue asks for; every relaygate_* name is in the contract."""
    dash, exprs = dashboard_exprs()
    errors = []
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    for row in ("Overview", "Upstreams", "Rate limiting", "Tokens and cost", "Gateway", "Response cache"):
        if row not in rows:
            errors.append(f"dashboard: no row {row!r}")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("model", "upstream"):
        q = variables.get(name, {}).get("definition", "")
        if not q.startswith("label_values("):
            errors.append(f"dashboard: variable {name} is missing or not a label_values query")
    texts = [e for _, e in exprs] + [v.get("definition", "") for v in variables.values()]
    errors += unknown_names(texts, "dashboard")
    errors += layout_errors(dash["panels"])
    print(f"{len(exprs)} dashboard queries, rows {sorted(rows)}")
    return fail(errors)


def layout_errors(panels):
    """Panel ids are unique, and no two panels share a grid cell (Grafana
    would silently push one down) or cross the 24-column edge."""
    errors, ids, cells = [], {}, {}
    for p in panels:
        where = f"dashboard: panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            errors.append(f"{where}: id already used by {ids[p['id']]!r}")
        ids[p.get("id")] = p.get("title")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")):
            errors.append(f"{where}: gridPos {g} is not h, w, x, y")
            continue
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            errors.append(f"{where}: gridPos {g} crosses the 24-column grid")
        overlaps = {cells[(x, y)] for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"]) if (x, y) in cells}
        for other in sorted(overlaps):
            errors.append(f"{where}: overlaps panel {other!r}")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                cells[(x, y)] = p.get("title")
    return errors


def unknown_names(texts, where):
    recorded = recorded_names()
    errors = []
    for text in texts:
        text = re.sub(r'"[^"]*"', '""', text)  # not inside label values
        for name in re.findall(r"\brelaygate_[a-z0-9_]+", text):
            if name not in CONTRACT:
                errors.append(f"{where}: {name} is not in the metric contract: {text.strip()[:120]}")
        for name in re.findall(r"\brelaygate:[a-z0-9_:]+", text):
            if name not in recorded:
                errors.append(f"{where}: {name} is not a recording rule in {RECORDING}")
    return errors


def check_rule_metric_names():
    """The rules name only contract metrics and recorded series."""
    texts = [r["expr"] for g in load(RECORDING)["groups"] for r in g["rules"]]
    texts += [r["expr"] for r in alert_rules()]
    return fail(unknown_names(texts, "rules"))


def documented_metrics():
    """The relaygate_* names in the first column of docs/metrics.md's tables."""
    return {m for line in METRICS_DOC.read_text().splitlines()
            for m in re.findall(r"^\|\s*`(relaygate_[a-z0-9_]+)`\s*\|", line)}


def check_metrics_documented():
    """Every metric of the contract has a row in docs/metrics.md, and every
    row names a metric of the contract (histograms by their base name)."""
    documented = documented_metrics()
    contract = COUNTERS_AND_GAUGES | HISTOGRAMS
    errors = [f"{METRICS_DOC}: no row for {name}" for name in sorted(contract - documented)]
    errors += [f"{METRICS_DOC}: {name} is not in the metric contract (tests/ops/ops_checks.py)"
               for name in sorted(documented - contract)]
    print(f"{len(documented)} metrics documented, {len(contract)} in the contract")
    return fail(errors)


def k8s_docs(directory):
    for path in sorted((K8S / directory).glob("*.yaml")):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield path, doc


def check_podmonitor():
    """kubernetes-validate has no schema for the PodMonitor CRD: check its
    required fields here, and that it selects the sidecar pods and names
    a port that they expose."""
    errors = []
    docs = list(k8s_docs("sidecar"))
    monitors = [(p, d) for p, d in docs if d.get("kind") == "PodMonitor"]
    if not monitors:
        return fail(["deploy/k8s/sidecar: no PodMonitor"])
    pods = [d["spec"]["template"] for _, d in docs if d.get("kind") == "Deployment"]
    for path, m in monitors:
        if m.get("apiVersion") != "monitoring.coreos.com/v1":
            errors.append(f"{path}: apiVersion {m.get('apiVersion')!r}, want monitoring.coreos.com/v1")
        if not m.get("metadata", {}).get("name"):
            errors.append(f"{path}: no metadata.name")
        spec = m.get("spec") or {}
        selector = spec.get("selector") or {}
        match = selector.get("matchLabels") or {}
        if not match and not selector.get("matchExpressions"):
            errors.append(f"{path}: spec.selector selects nothing")
        endpoints = spec.get("podMetricsEndpoints") or []
        if not endpoints:
            errors.append(f"{path}: no spec.podMetricsEndpoints")
        selected = [t for t in pods if match.items() <= (t["metadata"].get("labels") or {}).items()]
        if not selected:
            errors.append(f"{path}: selector {match} matches no Deployment's pods")
        allowed = {"port", "portNumber", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                   "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "params",
                   "bearerTokenSecret", "basicAuth", "authorization", "tlsConfig", "followRedirects",
                   "enableHttp2", "filterRunning", "proxyUrl", "oauth2", "trackTimestampsStaleness"}
        for ep in endpoints:
            extra = set(ep) - allowed
            if extra:
                errors.append(f"{path}: unknown podMetricsEndpoints fields {sorted(extra)}")
            if "port" not in ep and "portNumber" not in ep:
                errors.append(f"{path}: an endpoint names no port")
            port_names = {pt.get("name") for t in selected
                          for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])
                          for pt in c.get("ports", [])}
            if "port" in ep and ep["port"] not in port_names:
                errors.append(f"{path}: port {ep['port']!r} is not a named port of the selected pods")
            if not any(rl.get("targetLabel") == "job" and rl.get("replacement") == "relaygate"
                       for rl in ep.get("relabelings", [])):
                errors.append(f"{path}: no relabeling sets job=\"relaygate\" (the alerts select it)")
    return fail(errors)


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unsupported duration {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def check_k8s_config():
    """The ConfigMaps' TOML uses only accepted keys, and each Deployment's
    terminationGracePeriodSeconds exceeds shutdown_grace plus any preStop
    sleep."""
    errors = []
    for directory in ("sidecar", "shared"):
        docs = list(k8s_docs(directory))
        grace = None
        for path, d in docs:
            if d.get("kind") != "ConfigMap":
                continue
            for key, text in (d.get("data") or {}).items():
                if not key.endswith(".toml"):
                    continue
                try:
                    cfg = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    errors.append(f"{path}: {key}: {e}")
                    continue
                errors += config_key_errors(f"{path}: {key}", cfg)
                grace = duration_seconds(cfg.get("server", {}).get("shutdown_grace", "30s"))
        if grace is None:
            errors.append(f"deploy/k8s/{directory}: no ConfigMap with a .toml config")
            continue
        for path, d in docs:
            if d.get("kind") != "Deployment":
                continue
            spec = d["spec"]["template"]["spec"]
            if not any(c["name"] == "relaygate" for c in spec.get("containers", []) + spec.get("initContainers", [])):
                continue
            pre_stop = 0
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                if len(cmd) == 2 and cmd[0] == "sleep":
                    pre_stop = max(pre_stop, int(cmd[1]))
            tgp = spec.get("terminationGracePeriodSeconds", 30)
            if not tgp > grace + pre_stop:
                errors.append(f"{path}: terminationGracePeriodSeconds {tgp} <= shutdown_grace {grace:g}s"
                              f" + preStop {pre_stop}s")
    return fail(errors)


def extract_configs(out_dir):
    """Write the ConfigMaps' TOML files to out_dir, for `relaygate check`."""
    count = 0
    for directory in ("sidecar", "shared"):
        for path, d in k8s_docs(directory):
            if d.get("kind") != "ConfigMap":
                continue
            for key, text in (d.get("data") or {}).items():
                if key.endswith(".toml"):
                    out = Path(out_dir) / f"{directory}-{d['metadata']['name']}-{key}"
                    out.write_text(text)
                    print(out)
                    count += 1
    return 0 if count else 1


def config_key_errors(where, cfg):
    errors = []
    for section, value in cfg.items():
        if section not in CONFIG_KEYS:
            errors.append(f"{where}: unknown section [{section}]")
            continue
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            for key in set(table) - CONFIG_KEYS[section]:
                errors.append(f"{where}: unknown key {section}.{key}")
            for target in table.get("targets", []) if section == "models" else []:
                for key in set(target) - TARGET_KEYS:
                    errors.append(f"{where}: unknown key models.targets.{key}")
            for key in set(table.get("price", {}) if section == "models" else {}) - PRICE_KEYS:
                errors.append(f"{where}: unknown key models.price.{key}")
            for key in set(table.get("cache", {}) if section == "models" else {}) - MODEL_CACHE_KEYS:
                errors.append(f"{where}: unknown key models.cache.{key}")
    return errors


CHECKS = {
    "alert-annotations": check_alert_annotations,
    "runbook-anchors": check_runbook_anchors,
    "alert-tests-cover": check_alert_tests_cover,
    "routes-cases": routes_cases,
    "inhibitions": check_inhibitions,
    "dashboard": check_dashboard,
    "dashboard-rules": dashboard_rules,
    "rule-metric-names": check_rule_metric_names,
    "metrics-documented": check_metrics_documented,
    "podmonitor": check_podmonitor,
    "k8s-config": check_k8s_config,
    "extract-configs": extract_configs,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(CHECKS)}}} [args]")
    sys.exit(CHECKS[sys.argv[1]](*sys.argv[2:]))
