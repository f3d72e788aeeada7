#!/usr/bin/env bash
# The end-to-end benchmark of issue 7: direct vs nginx vs relaygate, side by
# side, on this machine, over loopback. See bench/README.md.
#
#   bench/run.sh            # full run: about 100 s after the build
#   bench/run.sh --quick    # about 40 s after the build
#   bench/run.sh --no-build # use the release binaries already built
#   bench/run.sh --ab OLD   # OLD (another relaygate binary) and this build:
#                           # saturation alternating 5 times, then RSS per
#                           # open stream alternating 3 times
#   bench/run.sh --cache    # the response cache: CPU and instructions per
#                           # request for a hit, a miss and the proxy path
#                           # (with --ab OLD: OLD and this build, alternating)
#   bench/run.sh --passthrough # the pass-through (POST /v1/moderations) next
#                           # to chat: CPU and instructions per request
#   bench/run.sh --budget   # spend budgets: CPU and instructions per plain
#                           # request with no budget and with one local one
#
# Core 1 runs the proxy under test (nginx or relaygate, `taskset -c 1`);
# core 0 runs the load generator and the simulated upstream. Everything
# binds 127.0.0.1 on ephemeral ports; a trap stops every process this
# script started and removes its temp dir (BENCH_KEEP=1 keeps it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/bench"
QUICK=0
BUILD=1
AB_OLD=""
CACHE=0
PASSTHROUGH=0
BUDGET=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --cache) CACHE=1 ;;
    --passthrough) PASSTHROUGH=1 ;;
    --budget) BUDGET=1 ;;
    --ab)
      AB_OLD="${2:-}"
      [ -x "$AB_OLD" ] || { echo "bench: --ab needs an executable relaygate binary" >&2; exit 2; }
      shift
      ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  RATE_FOR=5s SAT_FOR=4s WARM_FOR=1s TTFB_SAMPLES=500 STREAM_COUNTS=(1000)
else
  RATE_FOR=15s SAT_FOR=10s WARM_FOR=2s TTFB_SAMPLES=2000 STREAM_COUNTS=(1000 10000)
fi
RATE=1000           # fixed request rate for the latency runs
OHA_CONNS=16        # oha workers for the fixed rate (plenty at 1,000 req/s)
WRK_CONNS=50        # wrk connections for saturation
PROXY_CORE=1
LOAD_CORE=0
export BENCH_KEY="sk-bench-client-key-0123456789"
BODY='{"model":"deepseek-chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}'

# --- tools --------------------------------------------------------------------
need() { command -v "$1" >/dev/null || { echo "bench: $1 not found: $2" >&2; exit 1; }; }
export PATH="$PATH:$HOME/.cargo/bin"
# --ab measures saturation only (wrk); the full run also needs oha.
[ -n "$AB_OLD" ] || [ "$CACHE" = 1 ] || [ "$PASSTHROUGH" = 1 ] || [ "$BUDGET" = 1 ] || need oha "cargo install oha --locked"
need wrk "apt-get install wrk"
need nginx "apt-get install nginx"
need taskset "apt-get install util-linux"
need python3 "apt-get install python3"
need curl "apt-get install curl"
need pgrep "apt-get install procps"
if [ "$(nproc)" -lt 2 ]; then echo "bench: needs 2 CPUs (one for the proxy, one for the load)" >&2; exit 1; fi

if [ "$BUILD" = 1 ]; then
  echo "bench: cargo build --release --bins" >&2
  (cd "$ROOT" && cargo build --release --bins --quiet)
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
for b in relaygate relaygate-sim; do
  [ -x "$BIN/$b" ] || { echo "bench: $BIN/$b missing (run without --no-build)" >&2; exit 1; }
done

# 10,000 streams through a proxy hold 20,000 descriptors in it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FD_LIMIT="$(ulimit -n)"
# A proxy holds 2 descriptors per stream (client and upstream side), for the
# N streams and the 50 warm-up ones. Where N does not fit, the largest
# multiple of 500 that does is measured instead, and the table says so.
FITS=$(((FD_LIMIT - 1000) / 2 - 50))
STREAMS=()
for n in "${STREAM_COUNTS[@]}"; do
  if [ "$n" -gt "$FITS" ]; then
    m=$((FITS / 500 * 500))
    echo "bench: open-files limit $FD_LIMIT (hard $(ulimit -Hn)) fits $FITS streams: measuring $m instead of $n" >&2
    n=$m
  fi
  [ "$n" -gt 0 ] && STREAMS+=("$n")
done

# --- processes and cleanup ---------------------------------------------------------
TMP="$(mktemp -d -t relaygate-bench.XXXXXX)"
RESULTS="$TMP/results"
mkdir -p "$RESULTS" "$TMP/nginx-temp"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX: the first match's first capture group, within 15 s.
wait_for() {
  local deadline=$((SECONDS + 15)) line
  while [ "$SECONDS" -lt "$deadline" ]; do
    line="$(grep -oE "$2" "$1" 2>/dev/null | head -n1 || true)"
    if [ -n "$line" ]; then echo "${line##*http://}"; return 0; fi
    sleep 0.05
  done
  echo "bench: timed out waiting for '$2' in $1:" >&2
  cat "$1" >&2 || true
  exit 1
}

# stop PID: stop one process this script started, wait for it, forget it.
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() pid
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}

start_sim() { # NAME ARGS... -> sets SIM_ADDR, SIM_PID
  local name="$1"
  shift
  taskset -c "$LOAD_CORE" "$BIN/relaygate-sim" --threads 1 --name "$name" "$@" \
    </dev/null >"$TMP/sim-$name.out" 2>"$TMP/sim-$name.err" &
  SIM_PID=$!
  PIDS+=("$SIM_PID")
  SIM_ADDR="$(wait_for "$TMP/sim-$name.out" 'listening on http://[0-9.:]+')"
}

start_nginx() { # [CONNECTIONS] -> NGINX_ADDR, NGINX_PIDS (master,worker)
  # worker_connections preallocates per connection: 4096 for the load runs
  # (so idle RSS is that of an ordinary config), more to hold many streams.
  local connections="${1:-4096}" port user=""
  port="$(python3 "$BENCH/bench.py" free-ports 1)"
  [ "$(id -u)" = 0 ] && user="user $(id -un) $(id -gn);"
  cat >"$TMP/nginx.conf" <<EOF
# Generated by bench/run.sh: nginx as a plain reverse proxy with keepalive.
$user
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
worker_rlimit_nofile $FD_LIMIT;
events { worker_connections $connections; }  # client and upstream connections both count
http {
  access_log $TMP/nginx-access.log;
  keepalive_requests 1000000;  # the default (1000) closes a client connection every 1000 requests
  client_body_temp_path $TMP/nginx-temp/body;
  proxy_temp_path $TMP/nginx-temp/proxy;
  fastcgi_temp_path $TMP/nginx-temp/fastcgi;
  uwsgi_temp_path $TMP/nginx-temp/uwsgi;
  scgi_temp_path $TMP/nginx-temp/scgi;
  upstream fast { server $FAST_ADDR; keepalive 128; keepalive_requests 1000000; }
  upstream slow { server $SLOW_ADDR; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port backlog=4096;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;   # SSE goes through as it comes
    proxy_read_timeout 600s;
    location /slow/ { proxy_pass http://slow/; }
    location / { proxy_pass http://fast; }
  }
}
EOF
  taskset -c "$PROXY_CORE" nginx -e "$TMP/nginx-error.log" -p "$TMP" -c "$TMP/nginx.conf" \
    </dev/null >"$TMP/nginx.out" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
  NGINX_ADDR="127.0.0.1:$port"
  local deadline=$((SECONDS + 15))
  until curl -fsS -o /dev/null -X POST -H "Authorization: Bearer $BENCH_KEY" -H 'Content-Type: application/json' \
    -d "$BODY" "http://$NGINX_ADDR/v1/chat/completions" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "bench: nginx did not start" >&2; cat "$TMP/nginx.out" "$TMP/nginx-error.log" >&2; exit 1; }
    sleep 0.05
  done
  NGINX_PIDS="$NGINX_PID,$(pgrep -P "$NGINX_PID" | paste -sd, -)"
}

write_relaygate_config() {
  local timeouts='connect_timeout = "2s"
first_byte_timeout = "30s"
idle_timeout = "600s"
request_timeout = "900s"'
  cat >"$TMP/relaygate.toml" <<EOF
# Generated by bench/run.sh: every layer on. Auth (a client key), routing (a
# model with two targets), the retry policy and budget, a breaker per
# upstream (default settings), a local rate limit, metrics, the access log.
[server]
listen = "127.0.0.1:0"
max_in_flight = 30000
shutdown_grace = "1s"

[retry]
max_attempts = 3

[[keys]]
name = "bench"
key = "$BENCH_KEY"

[[upstreams]]
name = "fast-a"
base_url = "http://$FAST_ADDR/v1"
$timeouts

[[upstreams]]
name = "fast-b"
base_url = "http://$FAST_ADDR/v1"
$timeouts

[[upstreams]]
name = "slow-a"
base_url = "http://$SLOW_ADDR/v1"
$timeouts

[[upstreams]]
name = "slow-b"
base_url = "http://$SLOW_ADDR/v1"
$timeouts

[[models]]
name = "deepseek-chat"
targets = [{ upstream = "fast-a", priority = 0 }, { upstream = "fast-b", priority = 1 }]
price = { input_per_mtok = 0.28, output_per_mtok = 0.42, cached_input_per_mtok = 0.028 }

[[models]]
name = "deepseek-slow"
targets = [{ upstream = "slow-a", priority = 0 }, { upstream = "slow-b", priority = 1 }]

# The same slow upstream over HTTP/2 (h2c): streams share one connection.
[[upstreams]]
name = "slow-h2"
base_url = "http://$SLOW_ADDR/v1"
http_version = "2"
$timeouts

[[models]]
name = "deepseek-slow-h2"
targets = [{ upstream = "slow-h2" }]

[[rate_limits]]
scope = "key"
requests_per_minute = 100000000
EOF
}

start_relaygate() { # [BINARY] -> RELAYGATE_ADDR, RELAYGATE_PID; RELAYGATE_WRAP: a command to run it under,
  # RELAYGATE_TOML: another config file
  # Removed first: the shell truncates it in the child, after this script
  # may already have read the previous run's address from it.
  rm -f "$TMP/relaygate.out"
  taskset -c "$PROXY_CORE" ${RELAYGATE_WRAP:-} "${1:-$BIN/relaygate}" serve --config "${RELAYGATE_TOML:-$TMP/relaygate.toml}" --listen 127.0.0.1:0 \
    </dev/null >"$TMP/relaygate.out" 2>>"$TMP/relaygate.log" &
  RELAYGATE_PID=$!
  PIDS+=("$RELAYGATE_PID")
  RELAYGATE_ADDR="$(wait_for "$TMP/relaygate.out" 'listening on http://[0-9.:]+')"
  # One request through it before measuring. Retried like nginx's: once, right
  # after 9,000 streams had been closed, the first connect was refused.
  local deadline=$((SECONDS + 15))
  until curl -fsS -o /dev/null -X POST -H "Authorization: Bearer $BENCH_KEY" -H 'Content-Type: application/json' \
    -d "$BODY" "http://$RELAYGATE_ADDR/v1/chat/completions" 2>>"$TMP/curl.err"; do
    [ "$SECONDS" -lt "$deadline" ] || {
      echo "bench: relaygate did not answer" >&2
      cat "$TMP/curl.err" >&2
      tail -20 "$TMP/relaygate.log" >&2
      exit 1
    }
    echo "bench: relaygate refused a first request; retrying (see curl.err)" >&2
    sleep 0.05
  done
}

# --- measurements ---------------------------------------------------------------------
load() { taskset -c "$LOAD_CORE" "$@"; }

cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $BENCH_KEY"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"rps": %.1f, "requests": %d, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests / (summary.duration / 1e6), summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
EOF

oha_json_to_result() { # oha's JSON on stdin -> {p50_ms, p99_ms, rps, non_200}
  python3 -c '
import json, sys
o = json.load(sys.stdin)
p = o["latencyPercentiles"]
codes = o.get("statusCodeDistribution", {})
print(json.dumps({
  "p50_ms": p["p50"] * 1000, "p90_ms": p["p90"] * 1000, "p99_ms": p["p99"] * 1000,
  "rps": o["summary"]["requestsPerSec"],
  # oha cancels the requests in flight when -z ends: not failures.
  "non_200": sum(v for k, v in codes.items() if k != "200")
  + sum(v for k, v in o.get("errorDistribution", {}).items() if k != "aborted due to deadline"),
}))'
}

saturate() { # URL [PIDS] [LUA] -> wrk's JSON on stdout, with proxy_cpu_s: the PIDS' CPU time over the run
  local url="$1" pids="${2:-}" lua="${3:-$TMP/post.lua}" cpu_before=0 cpu_after=0 raw
  [ -n "$pids" ] && cpu_before="$(python3 "$BENCH/bench.py" cpu ${pids//,/ })"
  raw="$(load wrk -t1 -c"$WRK_CONNS" -d"$SAT_FOR" -s "$lua" "$url" | sed -n 's/^WRKJSON //p')"
  [ -n "$pids" ] && cpu_after="$(python3 "$BENCH/bench.py" cpu ${pids//,/ })"
  python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d["proxy_cpu_s"] = float(sys.argv[3]) - float(sys.argv[2]); print(json.dumps(d))' \
    "$raw" "$cpu_before" "$cpu_after"
}

measure() { # NAME URL [PIDS]: fixed-rate latency, saturation (and the PIDS' CPU time), streaming TTFB
  local name="$1" url="$2" pids="${3:-}"
  echo "bench: $name: warm-up, oha at $RATE req/s for $RATE_FOR, wrk for $SAT_FOR, TTFB x$TTFB_SAMPLES" >&2
  load wrk -t1 -c"$WRK_CONNS" -d"$WARM_FOR" -s "$TMP/post.lua" "$url" >/dev/null
  load oha --no-tui --output-format json -z "$RATE_FOR" -q "$RATE" --latency-correction -c "$OHA_CONNS" \
    -m POST -H "Authorization: Bearer $BENCH_KEY" -H 'Content-Type: application/json' -d "$BODY" "$url" \
    | oha_json_to_result >"$RESULTS/oha-$name.json"
  saturate "$url" "$pids" >"$RESULTS/wrk-$name.json"
  load python3 "$BENCH/bench.py" ttfb --url "$url" --samples "$TTFB_SAMPLES" >"$RESULTS/ttfb-$name.json"
}

rss_json() { echo "{\"kib\": $(python3 "$BENCH/bench.py" rss "$@")}"; }

hold_streams() { # N NAME URL MODEL PIDS
  echo "bench: $2: RSS with $1 open slow streams" >&2
  load python3 "$BENCH/bench.py" streams --url "$3" --model "$4" --n "$1" --pids "$5" >"$RESULTS/streams$1-$2.json"
}

instructions_per_request() { # BINARY LUA OUT -> user-space instructions per request under callgrind
  # Counting is switched on after one second of requests (a cache's first
  # request stores its entry), for wrk -c8 over SAT_FOR (valgrind runs it
  # ~50x slower). "totals:" holds what was counted; "summary:" stays 0 with
  # --instr-atstart=no.
  local requests
  RELAYGATE_WRAP="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$3" start_relaygate "$1"
  local url="http://$RELAYGATE_ADDR/v1/chat/completions"
  load wrk -t1 -c1 -d1s -s "$2" "$url" >/dev/null
  callgrind_control -i on "$RELAYGATE_PID" >/dev/null
  requests="$(load wrk -t1 -c8 -d"$SAT_FOR" -s "$2" "$url" \
    | sed -n 's/^WRKJSON //p' | python3 -c 'import json, sys; print(json.load(sys.stdin)["requests"])')"
  callgrind_control -i off "$RELAYGATE_PID" >/dev/null
  stop "$RELAYGATE_PID"
  python3 -c 'import sys
lines = open(sys.argv[1]).read().splitlines()
total = next(int(l.split()[1]) for l in lines if l.startswith("totals:"))
print(format(round(total / int(sys.argv[2])), ","))' "$3" "$requests"
}

# --- the run ----------------------------------------------------------------------------
STARTED=$SECONDS
start_sim fast --chunks 5
FAST_ADDR="$SIM_ADDR"
start_sim slow --chunks 3 --stall-after 0 # one event, then silence until killed
SLOW_ADDR="$SIM_ADDR"
write_relaygate_config

if [ "$CACHE" = 1 ]; then
  # The response cache (issue 16): the same pair of upstreams behind the
  # cache and not, with the same body (after the first request, every cached
  # one is a hit) and with a body that changes on every request (0 % hits:
  # every cached one is a miss that is stored). With --ab OLD, each path
  # runs on OLD and on this build, alternating.
  # BENCH_CACHE_MAX_BYTES bounds the cache. The default, 256 MiB, is not
  # filled by a run of misses: the cache grows through it (new memory for
  # every entry). A bound the warm-up fills (4194304) measures the steady
  # state of a busy cache instead: every store evicts an entry.
  cat >>"$TMP/relaygate.toml" <<TOML

[[models]]
name = "deepseek-cached"
targets = [{ upstream = "fast-a", priority = 0 }, { upstream = "fast-b", priority = 1 }]
price = { input_per_mtok = 0.28, output_per_mtok = 0.42, cached_input_per_mtok = 0.028 }
cache = { when = "always" }

[cache]
max_bytes = ${BENCH_CACHE_MAX_BYTES:-268435456}
TOML
  for model in deepseek-chat deepseek-cached; do
    for vary in same varying; do
      sed "s/deepseek-chat/$model/" "$TMP/post.lua" >"$TMP/$model-$vary.lua"
      # A body per request: a counter makes each one unique (wrk -t1).
      [ "$vary" = same ] || cat >>"$TMP/$model-$vary.lua" <<'LUA'
counter = 0
request = function()
  counter = counter + 1
  local body = wrk.body:gsub("Say hello", "Say hello " .. counter)
  return wrk.format(nil, nil, nil, body)
end
LUA
    done
  done
  path_name() { case "$1-$2" in
    deepseek-chat-same) echo "proxy" ;; deepseek-chat-varying) echo "proxy, body varies" ;;
    deepseek-cached-same) echo "cache hit" ;; deepseek-cached-varying) echo "cache miss (0 % hits)" ;; esac; }
  builds=(this)
  [ -z "$AB_OLD" ] || builds=(old new)
  binary() { if [ "$1" = old ]; then echo "$AB_OLD"; else echo "$BIN/relaygate"; fi; }
  echo "relaygate response cache, $(date -u +%Y-%m-%dT%H:%M:%SZ): wrk -t1 -c$WRK_CONNS for $SAT_FOR, proxy on core $PROXY_CORE, cache max_bytes ${BENCH_CACHE_MAX_BYTES:-268435456}"
  [ -z "$AB_OLD" ] || echo "old: $AB_OLD"
  echo
  echo "| round | path | build | req/s | proxy CPU per request, µs | RSS after, MiB |"
  echo "|---|---|---|---|---|---|"
  for round in 1 2 3; do
    for model in deepseek-chat deepseek-cached; do
      for vary in same varying; do
        for build in "${builds[@]}"; do
          start_relaygate "$(binary "$build")"
          url="http://$RELAYGATE_ADDR/v1/chat/completions"
          load wrk -t1 -c"$WRK_CONNS" -d"$WARM_FOR" -s "$TMP/$model-$vary.lua" "$url" >/dev/null
          python3 -c 'import json, sys; d = json.loads(sys.argv[1])
assert d["errors"] == 0, d
print("| %s | %s | %s | %s | %.1f | %.0f |" % (sys.argv[2], sys.argv[3], sys.argv[4], format(d["rps"], ",.0f"),
  d["proxy_cpu_s"] / d["requests"] * 1e6, float(sys.argv[5]) / 1024))' \
            "$(saturate "$url" "$RELAYGATE_PID" "$TMP/$model-$vary.lua")" "$round" "$(path_name "$model" "$vary")" \
            "$build" "$(python3 "$BENCH/bench.py" rss "$RELAYGATE_PID")"
          stop "$RELAYGATE_PID"
        done
      done
    done
  done
  if command -v callgrind_control >/dev/null; then
    echo
    echo "| round | path | build | user-space instructions per request (callgrind) |"
    echo "|---|---|---|---|"
    for round in 1 2; do
      for model in deepseek-chat deepseek-cached; do
        for vary in same varying; do
          for build in "${builds[@]}"; do
            n="$(instructions_per_request "$(binary "$build")" "$TMP/$model-$vary.lua" \
              "$TMP/callgrind-$model-$vary-$build-$round.out")"
            echo "| $round | $(path_name "$model" "$vary") | $build | $n |"
          done
        done
      done
    done
  fi
  exit 0
fi

if [ "$PASSTHROUGH" = 1 ]; then
  # The pass-through (issue 19) next to chat, this build only: the same
  # simulator, one request each, a small JSON body both ways (moderations
  # names no model: it goes to [passthrough]'s upstream unchanged).
  cat >>"$TMP/relaygate.toml" <<TOML

[passthrough]
upstream = "fast-a"
TOML
  cp "$TMP/post.lua" "$TMP/chat.lua"
  sed 's|^wrk.body = .*|wrk.body = '"'"'{"input":"Say hello"}'"'"'\nwrk.path = "/v1/moderations"|' "$TMP/post.lua" >"$TMP/moderations.lua"
  echo "relaygate pass-through, $(date -u +%Y-%m-%dT%H:%M:%SZ): wrk -t1 -c$WRK_CONNS for $SAT_FOR, proxy on core $PROXY_CORE"
  echo
  echo "| round | path | req/s | proxy CPU per request, µs |"
  echo "|---|---|---|---|"
  for round in 1 2 3; do
    for path in chat moderations; do
      start_relaygate
      url="http://$RELAYGATE_ADDR/v1/chat/completions" # moderations.lua sets its own path
      load wrk -t1 -c"$WRK_CONNS" -d"$WARM_FOR" -s "$TMP/$path.lua" "$url" >/dev/null
      python3 -c 'import json, sys; d = json.loads(sys.argv[1])
assert d["errors"] == 0, d
print("| %s | %s | %s | %.1f |" % (sys.argv[2], sys.argv[3], format(d["rps"], ",.0f"), d["proxy_cpu_s"] / d["requests"] * 1e6))' \
        "$(saturate "$url" "$RELAYGATE_PID" "$TMP/$path.lua")" "$round" "$path"
      stop "$RELAYGATE_PID"
    done
  done
  if command -v callgrind_control >/dev/null; then
    echo
    echo "| round | path | user-space instructions per request (callgrind) |"
    echo "|---|---|---|"
    for round in 1 2; do
      for path in chat moderations; do
        n="$(instructions_per_request "$BIN/relaygate" "$TMP/$path.lua" "$TMP/callgrind-$path-$round.out")"
        echo "| $round | $path | $n |"
      done
    done
  fi
  exit 0
fi

if [ "$BUDGET" = 1 ]; then
  # Spend budgets (issue 17), this build only: the same plain requests with
  # no [[budgets]] and with one local budget on the bench key, large enough
  # never to refuse, so every request is estimated, priced, reserved and
  # settled. The config's RPM rule counts no tokens: the budget's token
  # estimate is its own.
  cp "$TMP/relaygate.toml" "$TMP/relaygate-budget.toml"
  cat >>"$TMP/relaygate-budget.toml" <<'TOML'

[[budgets]]
name = "bench-monthly"
scope = "key"
match = "bench"
usd = 1000000000
period = "month"
TOML
  toml_of() { if [ "$1" = none ]; then echo "$TMP/relaygate.toml"; else echo "$TMP/relaygate-budget.toml"; fi; }
  echo "relaygate spend budgets, $(date -u +%Y-%m-%dT%H:%M:%SZ): wrk -t1 -c$WRK_CONNS for $SAT_FOR, proxy on core $PROXY_CORE"
  echo
  echo "| round | budgets | req/s | proxy CPU per request, µs |"
  echo "|---|---|---|---|"
  for round in 1 2 3 4 5; do
    for which in none one; do
      RELAYGATE_TOML="$(toml_of "$which")" start_relaygate
      url="http://$RELAYGATE_ADDR/v1/chat/completions"
      load wrk -t1 -c"$WRK_CONNS" -d"$WARM_FOR" -s "$TMP/post.lua" "$url" >/dev/null
      python3 -c 'import json, sys; d = json.loads(sys.argv[1])
assert d["errors"] == 0, d
print("| %s | %s | %s | %.1f |" % (sys.argv[2], sys.argv[3], format(d["rps"], ",.0f"), d["proxy_cpu_s"] / d["requests"] * 1e6))' \
        "$(saturate "$url" "$RELAYGATE_PID")" "$round" "$which"
      stop "$RELAYGATE_PID"
    done
  done
  if command -v callgrind_control >/dev/null; then
    echo
    echo "| round | budgets | user-space instructions per plain request (callgrind) |"
    echo "|---|---|---|"
    for round in 1 2 3; do
      for which in none one; do
        n="$(RELAYGATE_TOML="$(toml_of "$which")" instructions_per_request "$BIN/relaygate" "$TMP/post.lua" \
          "$TMP/callgrind-budget-$which-$round.out")"
        echo "| $round | $which | $n |"
      done
    done
  fi
  exit 0
fi

if [ -n "$AB_OLD" ]; then
  # Two relaygate binaries against the same simulator, alternating, so that
  # the machine's drift hits both: saturation and each one's CPU time.
  echo "relaygate A/B, $(date -u +%Y-%m-%dT%H:%M:%SZ): wrk -t1 -c$WRK_CONNS for $SAT_FOR, proxy on core $PROXY_CORE"
  echo "old: $AB_OLD"
  echo "new: $BIN/relaygate"
  echo
  echo "| round | binary | req/s | proxy CPU per request, µs |"
  echo "|---|---|---|---|"
  for round in 1 2 3 4 5; do
    for which in old new; do
      if [ "$which" = old ]; then start_relaygate "$AB_OLD"; else start_relaygate; fi
      url="http://$RELAYGATE_ADDR/v1/chat/completions"
      load wrk -t1 -c"$WRK_CONNS" -d"$WARM_FOR" -s "$TMP/post.lua" "$url" >/dev/null
      python3 -c 'import json, sys; d = json.loads(sys.argv[1])
print("| %s | %s | %s | %.1f |" % (sys.argv[2], sys.argv[3], format(d["rps"], ",.0f"), d["proxy_cpu_s"] / d["requests"] * 1e6))' \
        "$(saturate "$url" "$RELAYGATE_PID")" "$round" "$which"
      stop "$RELAYGATE_PID"
    done
  done
  # Memory per open stream, a fresh process per run, alternating likewise.
  n="${STREAM_COUNTS[0]}"
  echo
  echo "| round | binary | RSS per open stream, $n streams, KiB |"
  echo "|---|---|---|"
  for round in 1 2 3; do
    for which in old new; do
      if [ "$which" = old ]; then start_relaygate "$AB_OLD"; else start_relaygate; fi
      hold_streams "$n" "ab-$which-$round" "http://$RELAYGATE_ADDR/v1/chat/completions" deepseek-slow "$RELAYGATE_PID"
      python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))
print("| %s | %s | %.1f |" % (sys.argv[2], sys.argv[3], d["per_stream_kib"]))' \
        "$RESULTS/streams$n-ab-$which-$round.json" "$round" "$which"
      stop "$RELAYGATE_PID"
    done
  done
  # Instructions per plain request, which do not drift with the machine:
  # each build under callgrind, counting switched on after the first
  # request, for wrk -c8 over a few seconds (valgrind runs it ~50x slower).
  if command -v callgrind_control >/dev/null; then
    echo
    echo "| round | binary | user-space instructions per plain request (callgrind) |"
    echo "|---|---|---|"
    for round in 1 2 3; do
      for which in old new; do
        n="$(instructions_per_request "$([ "$which" = old ] && echo "$AB_OLD" || echo "$BIN/relaygate")" \
          "$TMP/post.lua" "$TMP/callgrind-$which-$round.out")"
        echo "| $round | $which | $n |"
      done
    done
  fi
  exit 0
fi

measure direct "http://$FAST_ADDR/v1/chat/completions"

start_nginx
rss_json ${NGINX_PIDS//,/ } >"$RESULTS/idle-nginx.json"
measure nginx "http://$NGINX_ADDR/v1/chat/completions" "$NGINX_PIDS"
rss_json ${NGINX_PIDS//,/ } >"$RESULTS/afterload-nginx.json"
stop "$NGINX_PID"

start_relaygate
rss_json "$RELAYGATE_PID" >"$RESULTS/idle-relaygate.json"
measure relaygate "http://$RELAYGATE_ADDR/v1/chat/completions" "$RELAYGATE_PID"
rss_json "$RELAYGATE_PID" >"$RESULTS/afterload-relaygate.json"
stop "$RELAYGATE_PID"

# Memory per stream: a fresh proxy per run, so one run's freed memory does
# not hide the next one's growth.
for n in "${STREAMS[@]}"; do
  start_nginx $((FD_LIMIT - 100))
  hold_streams "$n" nginx "http://$NGINX_ADDR/slow/v1/chat/completions" deepseek-chat "$NGINX_PIDS"
  stop "$NGINX_PID"
  start_relaygate
  hold_streams "$n" relaygate "http://$RELAYGATE_ADDR/v1/chat/completions" deepseek-slow "$RELAYGATE_PID"
  stop "$RELAYGATE_PID"
  start_relaygate
  hold_streams "$n" relaygate-h2 "http://$RELAYGATE_ADDR/v1/chat/completions" deepseek-slow-h2 "$RELAYGATE_PID"
  stop "$RELAYGATE_PID"
done

echo
echo "relaygate benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $((SECONDS - STARTED)) s"
echo "proxy on core $PROXY_CORE, load + upstream on core $LOAD_CORE; $RATE req/s for $RATE_FOR (oha, latency-corrected), saturation $SAT_FOR (wrk -t1 -c$WRK_CONNS)"
echo
python3 "$BENCH/bench.py" report "$RESULTS" --streams "${STREAMS[@]}"
