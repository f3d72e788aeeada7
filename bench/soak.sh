#!/usr/bin/env bash
# The soak test of issue 7: relaygate under steady load for N minutes
# (default 10), sampling its RSS, open file descriptors, threads and
# in-flight requests every 10 s. It passes when RSS at the end is at most
# 1.1 x RSS at minute 1 and descriptors and threads do not grow.
#
#   bench/soak.sh                 # 10 minutes at 500 req/s (plus 5 req/s of streams)
#   bench/soak.sh --minutes 2     # shorter
#   bench/soak.sh --no-build      # use the release binaries already built
#
# Loopback only, ephemeral ports; the load is bounded by its duration; a trap
# stops every process this script started and removes its temp dir.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MINUTES=10
BUILD=1
RATE=500
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "soak: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
export PATH="$PATH:$HOME/.cargo/bin"
command -v oha >/dev/null || { echo "soak: oha not found: cargo install oha --locked" >&2; exit 1; }
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --bins --quiet)
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
KEY="sk-soak-client-key-0123456789"
BODY='{"model":"deepseek-chat","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}'
STREAM_BODY='{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"Say hello"}]}'

TMP="$(mktemp -d -t relaygate-soak.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

wait_for() { # FILE REGEX -> prints the first match
  local deadline=$((SECONDS + 15))
  until grep -Eo "$2" "$1" 2>/dev/null | head -1 | grep -q .; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "soak: timed out waiting for $1" >&2; exit 1; }
    sleep 0.05
  done
  grep -Eo "$2" "$1" | head -1
}

"$BIN/relaygate-sim" --threads 1 --name fast --chunks 20 --chunk-interval 10ms </dev/null >"$TMP/sim.out" 2>&1 &
PIDS+=($!)
SIM="$(wait_for "$TMP/sim.out" '127\.0\.0\.1:[0-9]+')"

cat >"$TMP/relaygate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[[keys]]
name = "soak"
key = "$KEY"

[[upstreams]]
name = "a"
base_url = "http://$SIM/v1"

[[upstreams]]
name = "b"
base_url = "http://$SIM/v1"

[[models]]
name = "deepseek-chat"
targets = [{ upstream = "a" }, { upstream = "b", priority = 1 }]
price = { input_per_mtok = 0.28, output_per_mtok = 0.42 }

[[rate_limits]]
scope = "key"
requests_per_minute = 100000000
EOF
RUST_LOG=warn "$BIN/relaygate" serve --config "$TMP/relaygate.toml" </dev/null >"$TMP/relaygate.out" 2>"$TMP/relaygate.err" &
GW_PID=$!
PIDS+=("$GW_PID")
GW="$(wait_for "$TMP/relaygate.out" '127\.0\.0\.1:[0-9]+')"

DURATION=$((MINUTES * 60))
echo "soak: relaygate pid $GW_PID on $GW, upstream $SIM; $RATE req/s plain + 5 req/s streams for ${MINUTES} min" >&2
oha --no-tui -z "${DURATION}s" -q "$RATE" -c 16 -m POST -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' -d "$BODY" "http://$GW/v1/chat/completions" >"$TMP/oha.txt" 2>&1 &
PIDS+=($!)
# Streams alongside: 5 a second, each read to its end.
(
  end=$((SECONDS + DURATION))
  while [ "$SECONDS" -lt "$end" ]; do
    for _ in 1 2 3 4 5; do
      curl -sN -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
        -d "$STREAM_BODY" "http://$GW/v1/chat/completions" &
    done
    sleep 1
  done
  wait
) &
PIDS+=($!)

sample() { # -> "seconds rss_kib fds threads in_flight"
  local rss fds threads inflight
  rss="$(awk '/^VmRSS/ {print $2}' "/proc/$GW_PID/status")"
  threads="$(awk '/^Threads/ {print $2}' "/proc/$GW_PID/status")"
  fds="$(find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)"
  inflight="$(curl -fsS "http://$GW/metrics" | awk '/^relaygate_in_flight_requests / {print $2}')"
  echo "$1 $rss $fds $threads $inflight"
}

printf '%8s %10s %6s %8s %10s\n' seconds rss_kib fds threads in_flight
start=$SECONDS
: >"$TMP/samples"
while [ $((SECONDS - start)) -lt "$DURATION" ]; do
  sleep 10
  s="$(sample $((SECONDS - start)))"
  echo "$s" >>"$TMP/samples"
  printf '%8s %10s %6s %8s %10s\n' $s
done
wait "${PIDS[2]}" 2>/dev/null || true

python3 - "$TMP/samples" "$TMP/oha.txt" <<'EOF'
import sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
# Minute 1: the first sample at or after 60 s (or the first sample for short runs).
first = next((r for r in rows if r[0] >= 60), rows[0])
last = rows[-1]
ratio = last[1] / first[1]
ok_rss = ratio <= 1.1
ok_fds = last[2] <= first[2] + 8
ok_threads = last[3] <= first[3]
print(f"soak: RSS {first[1]/1024:.1f} MiB at {first[0]:.0f}s -> {last[1]/1024:.1f} MiB at {last[0]:.0f}s "
      f"(x{ratio:.3f}, target <= 1.1): {'ok' if ok_rss else 'FAIL'}")
print(f"soak: fds {first[2]:.0f} -> {last[2]:.0f}: {'ok' if ok_fds else 'FAIL'}; "
      f"threads {first[3]:.0f} -> {last[3]:.0f}: {'ok' if ok_threads else 'FAIL'}")
summary = [l.strip() for l in open(sys.argv[2]) if "Success rate" in l or "Requests/sec" in l]
print("soak: oha " + "; ".join(summary))
sys.exit(0 if ok_rss and ok_fds and ok_threads else 1)
EOF
