#!/usr/bin/env python3
"""Helpers for bench/run.sh (Python 3.9+, standard library only).

  free-ports N                       print N free loopback TCP ports
  rss PID...                         print the summed VmRSS of PIDs, in KiB
  cpu PID...                         print the summed CPU time (user + system) of PIDs, in s
  ttfb --url U --samples N [...]     time to first SSE event, sequential, keep-alive
  streams --url U --n N --pids P,... hold N slow streams, report RSS growth per stream
  report DIR                         print the results table from DIR/*.json

Every measurement prints one JSON object on stdout; run.sh stores them and
`report` turns them into the table.
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit

KEY = os.environ.get("BENCH_KEY", "sk-bench-client-key-0123456789")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def request_bytes(url, model, stream):
    u = urlsplit(url)
    body = json.dumps(
        {
            "model": model,
            "stream": stream,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Say hello"}],
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return u.hostname, u.port, head.encode() + body


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def cmd_free_ports(args):
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_rss(args):
    print(rss_kib(args.pids))


def cpu_seconds(pids):
    """User + system time of PIDs (all their threads), from /proc/PID/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # Fields after the ")" that ends the command name: utime and
                # stime are fields 14 and 15 of the whole line.
                fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / ticks


def cmd_cpu(args):
    print(cpu_seconds(args.pids))


def cmd_ttfb(args):
    """Sequential streaming requests on one keep-alive connection. TTFB is
    from the request's first byte written to the first `data:` byte read;
    the rest of the stream is read to its end before the next request."""
    host, port, req = request_bytes(args.url, args.model, True)

    def connect():
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    sock = connect()
    samples = []
    i = 0
    reconnects = 0
    while i < args.warmup + args.samples:
        t0 = time.perf_counter_ns()
        buf = b""
        first = None
        try:
            sock.sendall(req)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if first is None and b"data:" in buf:
                    first = time.perf_counter_ns()
                if buf.endswith(b"\r\n0\r\n\r\n"):
                    break
        except OSError:
            buf = b""
        if not buf:
            # The server closed the keep-alive connection before this
            # request: reconnect and take the sample again.
            reconnects += 1
            if reconnects > 20:
                sys.exit(f"ttfb: {args.url} keeps closing the connection")
            sock.close()
            sock = connect()
            continue
        if not buf.startswith(b"HTTP/1.1 200") or b"[DONE]" not in buf:
            sys.exit(f"ttfb: unexpected response from {args.url}: {buf[:300]!r}")
        if i >= args.warmup:
            samples.append((first - t0) / 1e6)
        i += 1
    samples.sort()
    print(
        json.dumps(
            {
                "samples": len(samples),
                "reconnects": reconnects,
                "p50_ms": percentile(samples, 50),
                "p90_ms": percentile(samples, 90),
                "p99_ms": percentile(samples, 99),
            }
        )
    )


async def open_stream(host, port, req, gate):
    async with gate:
        reader, writer = await asyncio.open_connection(host, port, limit=4096)
        writer.write(req)
        await writer.drain()
        seen = b""
        while b"data:" not in seen:
            chunk = await reader.read(4096)
            if not chunk:
                raise RuntimeError(f"stream closed before its first event: {seen[:300]!r}")
            seen += chunk
        if not seen.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {seen[:300]!r}")
        return writer


async def open_many(host, port, req, n, deadline):
    gate = asyncio.Semaphore(200)
    tasks = [asyncio.ensure_future(open_stream(host, port, req, gate)) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for t in pending:
        t.cancel()
    writers, errors = [], []
    for t in done:
        if t.exception() is not None:
            errors.append(str(t.exception()))
        else:
            writers.append(t.result())
    return writers, errors, len(pending)


async def streams(args):
    host, port, req = request_bytes(args.url, args.model, True)
    pids = [int(p) for p in args.pids.split(",") if p]
    deadline = time.monotonic() + args.timeout
    warm, errors, late = await open_many(host, port, req, args.warm, deadline)
    await asyncio.sleep(0.5)  # let the proxy settle; RSS is a level, not an event
    before = rss_kib(pids)
    held, errors2, late2 = await open_many(host, port, req, args.n, deadline)
    errors += errors2
    late += late2
    await asyncio.sleep(0.5)
    after = rss_kib(pids)
    opened = len(held)
    result = {
        "n": args.n,
        "opened": opened,
        "errors": len(errors),
        "late": late,
        "first_error": errors[0] if errors else None,
        "before_kib": before,
        "after_kib": after,
        "per_stream_kib": (after - before) / opened if opened else None,
    }
    for w in warm + held:
        w.close()
    print(json.dumps(result))


def cmd_streams(args):
    asyncio.run(streams(args))


# --- the table ---------------------------------------------------------------


def load(d, name):
    try:
        with open(os.path.join(d, name + ".json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def get(d, name, *path):
    v = load(d, name)
    for p in path:
        if v is None:
            return None
        v = v.get(p) if isinstance(v, dict) else None
    return v


def fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def cmd_report(args):
    d = args.dir
    targets = ["direct", "nginx", "relaygate"]
    rows = []

    def row(label, values, ratio=True, target="", digits=2):
        n, r = values.get("nginx"), values.get("relaygate")
        q = f"{r / n:.2f}" if ratio and n and r is not None else "—"
        rows.append([label] + [fmt(values.get(t), digits) for t in targets] + [q, target])

    def per(name, *path, scale=1.0):
        out = {}
        for t in targets:
            v = get(d, f"{name}-{t}", *path)
            out[t] = None if v is None else v * scale
        return out

    def added(values):
        base = values.get("direct")
        return {t: (None if base is None or values[t] is None else values[t] - base) for t in targets if t != "direct"}

    row("max req/s, non-streaming (wrk)", per("wrk", "rps"), target="≥ 0.8 × nginx", digits=0)
    # The proxy's own CPU time during the saturation run, per request: what
    # it costs whatever the load side could deliver.
    cpu = {}
    for t in ("nginx", "relaygate"):
        secs, reqs = get(d, f"wrk-{t}", "proxy_cpu_s"), get(d, f"wrk-{t}", "requests")
        cpu[t] = secs / reqs * 1e6 if secs and reqs else None
    row("  proxy CPU per request at saturation, µs", cpu, digits=1)
    row(
        "  requests per proxy CPU-second (1 / that)",
        {t: (1e6 / v if v else None) for t, v in cpu.items()},
        digits=0,
    )
    p50 = per("oha", "p50_ms")
    p99 = per("oha", "p99_ms")
    row("p50 at 1,000 req/s, ms (oha)", p50, digits=3)
    row("p99 at 1,000 req/s, ms (oha)", p99, digits=3)
    row("  added p50 over direct, ms", added(p50), target="≤ 0.15", digits=3)
    row("  added p99 over direct, ms", added(p99), target="≤ 0.5", digits=3)
    t50 = per("ttfb", "p50_ms")
    t99 = per("ttfb", "p99_ms")
    row("stream TTFB p50, ms", t50, digits=3)
    row("stream TTFB p99, ms", t99, digits=3)
    row("  added TTFB p50 over direct, ms", added(t50), target="≤ 0.15", digits=3)
    row("  added TTFB p99 over direct, ms", added(t99), digits=3)
    for n in args.streams:
        row(f"RSS per open stream, {n:,} streams, KiB", per(f"streams{n}", "per_stream_kib"), target="≤ 20", digits=1)
    for n in args.streams:
        # relaygate with http_version = "2" to the upstream (h2c): every
        # stream on one upstream connection. nginx cannot proxy to HTTP/2.
        h2 = get(d, f"streams{n}-relaygate-h2", "per_stream_kib")
        row(f"  same, {n:,} streams, HTTP/2 (h2c) upstream, KiB", {"relaygate": h2}, ratio=False, target="≤ 20", digits=1)
    row("idle RSS at start, MiB", per("idle", "kib", scale=1 / 1024), target="≤ 15", digits=1)
    row("RSS after the load runs, MiB", per("afterload", "kib", scale=1 / 1024), digits=1)

    header = ["", "direct", "nginx", "relaygate", "relaygate/nginx", "target (relaygate)"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))

    notes = []
    for t in targets:
        codes = get(d, f"oha-{t}", "non_200")
        if codes:
            notes.append(f"{t}: oha saw {codes} non-200 answers")
        errs = get(d, f"wrk-{t}", "errors")
        if errs:
            notes.append(f"{t}: wrk saw {errs} errors or non-2xx answers")
        for n in args.streams:
            s = load(d, f"streams{n}-{t}") if t != "direct" else None
            if t == "relaygate":
                h2 = load(d, f"streams{n}-relaygate-h2")
                if h2 and (h2.get("errors") or h2.get("late")):
                    notes.append(f"relaygate-h2: {n:,} streams: {h2['opened']} opened, {h2['errors']} errors")
            if s and (s.get("errors") or s.get("late")):
                notes.append(
                    f"{t}: {n:,} streams: {s['opened']} opened, {s['errors']} errors, {s['late']} late"
                    f" ({s.get('first_error')})"
                )
    for note in notes:
        print("note:", note)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("free-ports")
    s.add_argument("n", type=int)
    s.set_defaults(func=cmd_free_ports)
    s = sub.add_parser("rss")
    s.add_argument("pids", nargs="+")
    s.set_defaults(func=cmd_rss)
    s = sub.add_parser("cpu")
    s.add_argument("pids", nargs="+")
    s.set_defaults(func=cmd_cpu)
    s = sub.add_parser("ttfb")
    s.add_argument("--url", required=True)
    s.add_argument("--model", default="deepseek-chat")
    s.add_argument("--samples", type=int, default=2000)
    s.add_argument("--warmup", type=int, default=200)
    s.set_defaults(func=cmd_ttfb)
    s = sub.add_parser("streams")
    s.add_argument("--url", required=True)
    s.add_argument("--model", default="deepseek-chat")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--warm", type=int, default=50)
    s.add_argument("--pids", required=True, help="comma-separated PIDs whose RSS is summed")
    s.add_argument("--timeout", type=float, default=120.0)
    s.set_defaults(func=cmd_streams)
    s = sub.add_parser("report")
    s.add_argument("dir")
    s.add_argument("--streams", type=int, nargs="*", default=[1000, 10000])
    s.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
