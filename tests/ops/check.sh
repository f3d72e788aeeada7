#!/usr/bin/env bash
# Static checks of the ops pack: docker-compose, Prometheus config and rules
# (with their unit tests), Alertmanager config and routing, Kubernetes
# manifests, runbook anchors and the Grafana dashboard's queries.
#
#   PYTHON=/path/to/venv/bin/python bash tests/ops/check.sh
#
# Needs: docker-compose (or `docker compose`), promtool and amtool (Debian:
# docker-compose, prometheus, prometheus-alertmanager), and a Python >= 3.11
# with tests/ops/requirements.txt installed, taken from $PYTHON (default
# python3). No network, no Docker engine. The last line is
# "ops: N passed, M failed"; the exit status is non-zero if M > 0.

set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
HELPER=tests/ops/ops_checks.py

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0

# run NAME COMMAND...: run a check, print its output only on failure.
run() {
    local name=$1
    shift
    if "$@" >"$tmp/out" 2>&1; then
        passed=$((passed + 1))
        echo "ok    $name"
    else
        failed=$((failed + 1))
        echo "FAIL  $name"
        sed 's/^/      /' "$tmp/out"
    fi
}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "$1 not found${2:+ ($2)}"; return 1; }
}

# --- docker-compose -------------------------------------------------------
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    compose=(docker compose)
fi
# Dummy secrets: the file must interpolate with them set, as in production.
compose_env=(HOLYSHEEP_API_KEY=dummy RELAYGATE_ADMIN_KEY=dummy APP_A_KEY=dummy
             GRAFANA_PASSWORD=dummy PAGERDUTY_ROUTING_KEY=dummy)

compose_config() {
    need "${compose[0]}" "apt-get install docker-compose" || return 1
    env "${compose_env[@]}" "${compose[@]}" -f docker-compose.yml "$@" config -q
}
compose_services() {
    local services
    services=$(env "${compose_env[@]}" "${compose[@]}" -f docker-compose.yml --profile demo config --services)
    for s in relaygate relaygate-demo prometheus alertmanager grafana redis; do
        grep -qx "$s" <<<"$services" || { echo "service $s missing"; return 1; }
    done
}
run "docker-compose config" compose_config
run "docker-compose config --profile demo" compose_config --profile demo
run "docker-compose services" compose_services

# --- Prometheus -----------------------------------------------------------
promtool_() {
    need promtool "apt-get install prometheus" || return 1
    promtool "$@"
}
run "promtool check config prometheus.yml" promtool_ check config prometheus.yml
run "promtool check rules" promtool_ check rules deploy/prometheus/recording.yml deploy/prometheus/alerts.yml
run "promtool test rules" promtool_ test rules deploy/prometheus/alerts.test.yml
run "alerts: severity, summary, description, runbook_url" "$PYTHON" "$HELPER" alert-annotations
run "alerts: every alert has a firing and a silent test" "$PYTHON" "$HELPER" alert-tests-cover
run "alerts: runbook_url anchors exist in docs/runbook.md" "$PYTHON" "$HELPER" runbook-anchors
run "rules: metric names are in the contract" "$PYTHON" "$HELPER" rule-metric-names
run "metrics: docs/metrics.md documents exactly the contract" "$PYTHON" "$HELPER" metrics-documented

# --- Alertmanager ---------------------------------------------------------
AM_CONFIG=deploy/alertmanager/alertmanager.yml
amtool_() {
    need amtool "apt-get install prometheus-alertmanager" || return 1
    amtool "$@"
}
run "amtool check-config" amtool_ check-config "$AM_CONFIG"
run "alertmanager: inhibition rules name real alerts" "$PYTHON" "$HELPER" inhibitions

# One routing case per alert (its severity decides the receiver), plus an
# alert without a severity. amtool prints the receiver it resolves to.
route_case() {
    local want=$1
    shift
    local got
    got=$(amtool_ config routes test --config.file="$AM_CONFIG" "$@" 2>/dev/null) || { echo "$got"; return 1; }
    [[ $got == "$want" ]] || { echo "labels $*: routed to '$got', want '$want'"; return 1; }
}
if "$PYTHON" "$HELPER" routes-cases >"$tmp/routes" 2>&1; then
    while read -r want labels; do
        # shellcheck disable=SC2086 # labels are space-separated arguments
        run "amtool route: ${labels} -> ${want}" route_case "$want" $labels
    done <"$tmp/routes"
else
    run "amtool routes cases" sh -c 'cat "$1"; exit 1' sh "$tmp/routes"
fi

# --- Kubernetes -----------------------------------------------------------
# kubernetes-validate knows the built-in kinds only; the PodMonitor (a CRD of
# the Prometheus Operator) is checked by the helper instead.
mapfile -t k8s_files < <(grep -L '^kind: PodMonitor' deploy/k8s/*/*.yaml)
run "kubernetes-validate --strict (${#k8s_files[@]} files)" \
    "$PYTHON" -m kubernetes_validate --strict --quiet "${k8s_files[@]}"
run "k8s: PodMonitor fields, selector and port" "$PYTHON" "$HELPER" podmonitor
run "k8s: config keys and termination grace" "$PYTHON" "$HELPER" k8s-config

# The ConfigMaps' TOML through relaygate's own parser, when a binary is at
# hand ($RELAYGATE_BIN, or the one `cargo test` leaves in target/). This
# script never builds it.
relaygate_bin=${RELAYGATE_BIN:-}
for candidate in target/debug/relaygate target/release/relaygate; do
    [[ -n $relaygate_bin ]] && break
    [[ -x $candidate ]] && relaygate_bin=$candidate
done
relaygate_check_configs() {
    mkdir -p "$tmp/configs"
    "$PYTHON" "$HELPER" extract-configs "$tmp/configs" >/dev/null || return 1
    for f in "$tmp/configs"/*.toml; do
        env HOLYSHEEP_API_KEY=dummy-upstream-key RELAYGATE_ADMIN_KEY=dummy-admin-key \
            APP_A_KEY=dummy-app-a-key "$relaygate_bin" check --config "$f" || return 1
    done
}
if [[ -n $relaygate_bin ]]; then
    run "k8s: relaygate check on the ConfigMaps ($relaygate_bin)" relaygate_check_configs
else
    echo "note  no relaygate binary: ConfigMaps checked by key names only"
fi

# --- Grafana --------------------------------------------------------------
run "grafana: dashboard is JSON" "$PYTHON" -m json.tool grafana/dashboards/relaygate.json
run "grafana: rows, variables, metric names" "$PYTHON" "$HELPER" dashboard
dashboard_promql() {
    "$PYTHON" "$HELPER" dashboard-rules "$tmp/dashboard-rules.yml" &&
        promtool_ check rules "$tmp/dashboard-rules.yml"
}
run "grafana: every dashboard query parses (promtool)" dashboard_promql

echo "ops: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
