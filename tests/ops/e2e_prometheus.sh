#!/usr/bin/env bash
# End-to-end check of the metrics pipeline (issue 6, section 8): a real
# Prometheus scrapes `relaygate demo` with the repository's rules, and every
# dashboard query and every recording rule must return data.
#
#   PYTHON=/path/to/venv/bin/python bash tests/ops/e2e_prometheus.sh
#
# 1. `relaygate demo` on 127.0.0.1 port 0 (the address is read from its first
#    line of output), driving its own traffic, the flaky upstream down 8 s
#    in every 20 s so that breakers, retries and failovers move.
# 2. Prometheus on a free loopback port, scraping the demo every second and
#    evaluating deploy/prometheus/recording.yml and alerts.yml every 2 s.
# 3. Once the demo has been scraped, a burst of 8 concurrent requests to
#    deepseek-flaky, which config/demo.toml lets through 3 at a time plus a
#    2 s queue: queue waits and 429s for the "Rate limiting" row.
# 4. Every 2 s, every query through /api/v1/query, until all of them return
#    data or MAX_TRAFFIC seconds have passed since Prometheus was ready. Then
#    one line per query, and "e2e-prometheus: N passed, M failed"; the exit
#    status is non-zero if M > 0.
# 5. Every relaygate_* name the demo exports must be in the metric contract
#    (tests/ops/ops_checks.py), which docs/metrics.md documents row by row.
#
# "Returns data": a non-empty result with a sample that is not NaN (see
# tests/ops/e2e_prometheus.py). Polling, not a fixed sleep: the run ends as
# soon as everything has data (about 15 s), and at most after MAX_TRAFFIC.
#
# Needs: a built relaygate ($RELAYGATE_BIN, default target/debug/relaygate;
# this script never builds it), prometheus ($PROMETHEUS; Debian package
# prometheus), curl, and a Python with PyYAML ($PYTHON, default python3).
# Loopback only, no fixed port; whatever it starts is stopped on exit.

set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
PROMETHEUS=${PROMETHEUS:-prometheus}
RELAYGATE_BIN=${RELAYGATE_BIN:-target/debug/relaygate}
MAX_TRAFFIC=${MAX_TRAFFIC:-45}    # seconds
HELPER=tests/ops/e2e_prometheus.py

# Queries that cannot have data after MAX_TRAFFIC seconds of demo traffic,
# by the name printed for them ("panel 'Title' A", "rule relaygate:…"), each
# with its reason. One without data is reported as "skip", one with data as
# a note to remove it. Prefer making the demo exercise a metric.
declare -A ALLOWLIST=(
)

tmp=$(mktemp -d)
relaygate_pid=
prometheus_pid=

# stop PID: SIGTERM, then SIGKILL after 5 s.
stop() {
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop "$prometheus_pid"
    stop "$relaygate_pid"
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "e2e-prometheus: $*" >&2
    exit 2
}
# show FILE: its last lines, indented, to explain a failure.
show() {
    tail -n 30 "$1" 2>/dev/null | sed 's/^/      /'
}

for tool in "$PROMETHEUS" curl "$PYTHON"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
[[ -x $RELAYGATE_BIN ]] || die "$RELAYGATE_BIN not found: run cargo build first"
"$PYTHON" "$HELPER" queries >"$tmp/queries" || die "cannot list the queries"

# --- relaygate demo -------------------------------------------------------
: >"$tmp/relaygate.out"
"$RELAYGATE_BIN" demo --listen 127.0.0.1:0 --outage-every 20s --outage 8s \
    >"$tmp/relaygate.out" 2>"$tmp/relaygate.err" &
relaygate_pid=$!
relaygate_addr=
deadline=$((SECONDS + 10))
while [[ -z $relaygate_addr ]]; do
    kill -0 "$relaygate_pid" 2>/dev/null || { show "$tmp/relaygate.err"; die "relaygate demo exited"; }
    ((SECONDS < deadline)) || { show "$tmp/relaygate.err"; die "relaygate demo printed no address in 10 s"; }
    line=$(head -n 1 "$tmp/relaygate.out")
    if [[ $line =~ ^relaygate\ listening\ on\ http://(127\.0\.0\.1:[0-9]+)$ ]]; then
        relaygate_addr=${BASH_REMATCH[1]}
    else
        sleep 0.1
    fi
done
echo "note  relaygate demo on $relaygate_addr"

# --- Prometheus -----------------------------------------------------------
# The rule files as they are, except for a group's own `interval:`: the
# 30-day budget group runs every 5m, and its first evaluation may come 5
# minutes after start. Here every group runs at the global 2 s.
mkdir -p "$tmp/rules" "$tmp/data"
for f in recording alerts; do
    sed -E 's/^( +interval:).*/\1 2s/' "deploy/prometheus/$f.yml" >"$tmp/rules/$f.yml"
done
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 2s
rule_files:
  - rules/recording.yml
  - rules/alerts.yml
scrape_configs:
  - job_name: relaygate
    metrics_path: /metrics
    static_configs:
      - targets: ["$relaygate_addr"]
EOF

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Another process may take the free port before Prometheus binds it: retry.
prometheus_url=
for attempt in 1 2 3; do
    port=$(free_port)
    "$PROMETHEUS" --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
    prometheus_pid=$!
    deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)) && kill -0 "$prometheus_pid" 2>/dev/null; do
        if curl -fsS --max-time 1 "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then
            prometheus_url=http://127.0.0.1:$port
            break
        fi
        sleep 0.2
    done
    [[ -n $prometheus_url ]] && break
    stop "$prometheus_pid"
    prometheus_pid=
    grep -q 'address already in use' "$tmp/prometheus.log" || break
done
[[ -n $prometheus_url ]] || { show "$tmp/prometheus.log"; die "Prometheus not ready in 20 s (attempt $attempt)"; }
ready=$SECONDS
echo "note  prometheus on $prometheus_url"

# --- a burst past the queue rule ------------------------------------------
# After the first scrape: counts already there at a series' first sample are
# no increase to rate().
deadline=$((SECONDS + 10))
until "$PYTHON" "$HELPER" scraped "$prometheus_url"; do
    ((SECONDS < deadline)) || { show "$tmp/prometheus.log"; die "Prometheus has not scraped the demo in 10 s"; }
    sleep 0.2
done
burst_pids=()
for ((i = 0; i < 8; i++)); do
    curl -sS -o /dev/null -w '%{http_code}\n' --max-time 10 "http://$relaygate_addr/v1/chat/completions" \
        -H 'Authorization: Bearer e2e' -H 'Content-Type: application/json' \
        -d '{"model":"deepseek-flaky","messages":[{"role":"user","content":"burst"}]}' \
        >"$tmp/burst.$i" 2>&1 &
    burst_pids+=($!)
done
wait "${burst_pids[@]}" || true
echo "note  burst to deepseek-flaky answered: $(sort "$tmp"/burst.* | uniq -c | xargs)"

# --- the queries ----------------------------------------------------------
# round: query everything into $tmp/verdicts; true if all that is not
# allowlisted has data.
round() {
    local verdict where expr missing=0
    "$PYTHON" "$HELPER" verdicts "$prometheus_url" >"$tmp/verdicts" || return 1
    while IFS=$'\t' read -r verdict where expr; do
        [[ $verdict == ok || -n ${ALLOWLIST[$where]:-} ]] || missing=$((missing + 1))
    done <"$tmp/verdicts"
    ((missing == 0))
}
until round; do
    ((SECONDS - ready < MAX_TRAFFIC)) || break
    kill -0 "$relaygate_pid" 2>/dev/null || { show "$tmp/relaygate.err"; die "relaygate demo exited"; }
    sleep 2
done
echo "note  $((SECONDS - ready)) s of traffic scraped"

passed=0
failed=0
# report STATUS WHERE EXPR [WHY]
report() {
    case $1 in
        ok) passed=$((passed + 1)) ;;
        FAIL) failed=$((failed + 1)) ;;
    esac
    printf '%-5s %s: %s%s\n' "$1" "$2" "$3" "${4:+  ($4)}"
}
if why=$("$PYTHON" "$HELPER" rules-health "$prometheus_url" 2>&1); then
    report ok prometheus "every rule group loaded, no rule in error"
else
    report FAIL prometheus "every rule group loaded, no rule in error" "${why//$'\n'/; }"
fi
if why=$("$PYTHON" "$HELPER" exported "$prometheus_url" 2>&1); then
    report ok prometheus "every exported relaygate_* name is in the metric contract"
else
    report FAIL prometheus "every exported relaygate_* name is in the metric contract" "${why//$'\n'/; }"
fi
[[ $(wc -l <"$tmp/verdicts") -eq $(wc -l <"$tmp/queries") ]] ||
    report FAIL prometheus "a verdict for every query" "$(wc -l <"$tmp/verdicts") of $(wc -l <"$tmp/queries")"
while IFS=$'\t' read -r verdict where expr; do
    reason=${ALLOWLIST[$where]:-}
    if [[ $verdict == ok ]]; then
        report ok "$where" "$expr"
        [[ -z $reason ]] || echo "note  $where is allowlisted but has data: remove it from ALLOWLIST"
    elif [[ -n $reason ]]; then
        report skip "$where" "$expr" "$verdict; allowlisted: $reason"
    else
        report FAIL "$where" "$expr" "$verdict"
    fi
done <"$tmp/verdicts"

if ((failed > 0)); then
    echo "note  Prometheus log:"
    show "$tmp/prometheus.log"
fi
echo "e2e-prometheus: $passed passed, $failed failed"
((failed == 0))
