// relaygate status page: polls /status.json every 2 s and keeps 5 minutes of
// polls here, in the tab. The server sends cumulative counters and histogram
// buckets; rates and per-interval percentiles are differences between polls,
// so the server keeps no history and no state per viewer.
//
// The DOM is built with textContent only (no innerHTML): names come from the
// config, and the CSP would refuse inline script anyway.
"use strict";

const POLL_MS = 2000;
const KEEP_MS = 5 * 60 * 1000;
const SLOTS = KEEP_MS / POLL_MS;
// A chart's width in polls: 5 minutes, but the first minute already fills a
// fifth of it rather than a few pixels at the right edge.
const width = () => Math.min(SLOTS, Math.max(30, ring.length));
const KEY = "relaygate.adminKey";
const STATE_TEXT = {
  closed: "✓ closed",
  half_open: "◐ half-open",
  open: "✕ open",
  forced_open: "✕ forced open",
};
const REASON_TEXT = {
  consecutive_failures: "failures in a row",
  failure_rate: "failure rate over the breaker window",
  probe_failed: "a half-open probe failed",
  admin: "forced open by an admin",
};

// Polls kept: { t: server uptime in ms, d: the JSON, p: the derived point }.
let ring = [];
let timer = null;
let running = null;
let polls = 0;

const $ = (sel, root = document) => root.querySelector(sel);

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "onclick") el.addEventListener("click", v);
    else el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid != null) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

const num = (x) => typeof x === "number" && isFinite(x);
const pct = (x) => (num(x) ? (x * 100).toFixed(x >= 0.9995 || x === 0 ? 0 : 1) + "%" : "–");
const ms = (x) => (num(x) ? (x < 1000 ? Math.round(x) + " ms" : (x / 1000).toFixed(2) + " s") : "–");
const rate = (x, digits = 1) => (num(x) ? x.toFixed(x >= 100 ? 0 : digits) : "–");
const usd = (x) => (num(x) ? "$" + (x >= 1 ? x.toFixed(2) : x.toFixed(4)) : "–");
function dur(sec) {
  if (!num(sec)) return "–";
  if (sec < 10) return sec.toFixed(1) + " s";
  if (sec < 120) return Math.round(sec) + " s";
  if (sec < 7200) return Math.round(sec / 60) + " min";
  return (sec / 3600).toFixed(1) + " h";
}
const quantiles = (q) => (q ? `${ms(q.p50)} / ${ms(q.p95)} / ${ms(q.p99)}` : "–");

// A percentile (in ms) of the requests between two polls, from the
// difference of their cumulative bucket counts, interpolated inside the
// bucket as Prometheus' histogram_quantile does.
function quantile(bounds, before, after, q) {
  if (!before || !after || after.length !== bounds.length + 1 || before.length !== after.length) return null;
  const d = after.map((c, i) => c - before[i]);
  const total = d[d.length - 1];
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (d[i] >= rank) {
      const below = i ? d[i - 1] : 0;
      const lower = i ? bounds[i - 1] : 0;
      const share = d[i] > below ? (rank - below) / (d[i] - below) : 1;
      return (lower + (bounds[i] - lower) * share) * 1000;
    }
  }
  return bounds[bounds.length - 1] * 1000;
}

const ratio = (ok, all) => (all > 0 ? ok / all : null);

// What changed between two polls, per second or as a share.
function point(prev, d) {
  const p = { inflight: d.overall.in_flight, upstreams: {} };
  for (const u of d.upstreams) p.upstreams[u.name] = { state: u.breaker.state };
  if (!prev) return p;
  const dt = (d.uptime_ms - prev.d.uptime_ms) / 1000;
  if (dt <= 0) return p;
  const a = prev.d.overall, b = d.overall, bounds = d.bounds;
  p.rps = (b.totals.requests - a.totals.requests) / dt;
  p.success = ratio(b.totals.ok - a.totals.ok, b.totals.eligible - a.totals.eligible);
  for (const q of [50, 95, 99]) p["p" + q] = quantile(bounds.latency_seconds, a.latency_buckets, b.latency_buckets, q / 100);
  p.ttft95 = quantile(bounds.ttft_seconds, a.ttft_buckets, b.ttft_buckets, 0.95);
  for (const u of d.upstreams) {
    const was = prev.d.upstreams.find((x) => x.name === u.name);
    if (!was) continue;
    const x = u.totals, y = was.totals;
    Object.assign(p.upstreams[u.name], {
      aps: (x.attempts - y.attempts) / dt,
      success: ratio(x.ok - y.ok, x.ok - y.ok + x.failed - y.failed),
      p95: quantile(bounds.latency_seconds, was.latency_buckets, u.latency_buckets, 0.95),
    });
  }
  return p;
}

// The poll about a minute before the latest (or the oldest kept), for
// per-minute rates that do not jump with every 2 s interval.
function minuteAgo() {
  const last = ring[ring.length - 1];
  return ring.find((e) => e.t >= last.t - 60000) || ring[0];
}

function ingest(d) {
  const last = ring[ring.length - 1];
  if (last && d.uptime_ms < last.t) ring = []; // the gateway restarted
  ring.push({ t: d.uptime_ms, d, p: point(ring[ring.length - 1], d) });
  while (ring.length > 1 && ring[0].t < d.uptime_ms - KEEP_MS) ring.shift();
}

// A sparkline of the kept polls: one polyline per series, broken where a
// value is missing, right-aligned so that the newest point is at the edge.
function spark(series, title, classes = []) {
  const n = width();
  const svg = s("svg", { class: "spark", viewBox: `0 0 ${n} 28`, preserveAspectRatio: "none", role: "img" });
  const values = series.flatMap((f) => ring.map((e) => f(e.p))).filter(num);
  const max = Math.max(1e-9, ...values);
  const t = s("title", {});
  t.textContent = `${title}, last 5 min (max ${rate(max, 2)})`;
  svg.append(t);
  series.forEach((f, k) => {
    let pts = [];
    const flush = () => {
      if (pts.length > 1) svg.append(s("polyline", { points: pts.join(" "), class: classes[k] || "" }));
      pts = [];
    };
    ring.forEach((e, i) => {
      const v = f(e.p);
      if (!num(v)) return flush();
      pts.push(`${n - ring.length + i + 1},${(27 - (v / max) * 25).toFixed(2)}`);
    });
    flush();
  });
  return svg;
}

// A breaker's states over the kept polls, as a strip of coloured cells,
// each with its state as a tooltip (the badge beside it names the state).
function strip(name) {
  const n = width();
  const svg = s("svg", { class: "strip", viewBox: `0 0 ${n} 1`, preserveAspectRatio: "none", role: "img" });
  const t = s("title", {});
  t.textContent = "breaker state, last 5 min (green closed, amber half-open, red open)";
  svg.append(t);
  ring.forEach((e, i) => {
    const st = (e.p.upstreams[name] || {}).state || "none";
    svg.append(s("rect", { x: n - ring.length + i, y: 0, width: 1.05, height: 1, class: st }));
  });
  return svg;
}

function tile(metric, label, value, sparkline) {
  const cls = value.length > 12 ? "value long" : "value";
  return h("div", { class: "tile", "data-metric": metric }, h("div", { class: "label" }, label), h("div", { class: cls }, value), sparkline);
}

function renderOverall(d) {
  const o = d.overall;
  const last = ring[ring.length - 1].p;
  $("#tiles").replaceChildren(
    tile("rps", "Requests/s (last 2 s)", rate(last.rps), spark([(p) => p.rps], "requests/s")),
    tile("success_rate", "Success rate", pct(o.success_rate), spark([(p) => p.success], "success rate per 2 s")),
    tile("latency", "Latency p50 / p95 / p99", quantiles(o.latency_ms),
      spark([(p) => p.p50, (p) => p.p95, (p) => p.p99], "latency p50 (blue) p95 (amber) p99 (red) per 2 s, ms", ["", "p95", "p99"])),
    tile("ttft", "TTFT p50 / p95 / p99", quantiles(o.ttft_ms), spark([(p) => p.ttft95], "TTFT p95 per 2 s, ms")),
    tile("in_flight", "In flight", String(o.in_flight), spark([(p) => p.inflight], "requests in flight")),
    tile("request_count", "Requests (5 min)", String(o.request_count), null),
  );
}

function breakerText(u) {
  const b = u.breaker;
  const why = REASON_TEXT[b.last_open_reason] || b.last_open_reason;
  const last = u.last_error ? `last error ${u.last_error.class}, ${dur(u.last_error.seconds_ago)} ago` : null;
  switch (b.state) {
    case "open":
      return [`opened ${dur(b.state_seconds)} ago: ${why}`, last, `next probe in ${dur(b.next_probe_seconds)}`];
    case "forced_open":
      return [`forced open ${dur(b.state_seconds)} ago`, "stays open until reset"];
    case "half_open":
      return [`probing for ${dur(b.state_seconds)}`, `opened because: ${why}`];
    default:
      return [
        `closed for ${dur(b.state_seconds)}`,
        b.window_failures ? `${b.window_failures} of ${b.window_requests} failed recently` : null,
      ];
  }
}

function renderUpstreams(d, admin) {
  const last = ring[ring.length - 1];
  const before = minuteAgo();
  const perMin = 60000 / Math.max(1, last.t - before.t);
  const rows = d.upstreams.map((u) => {
    const p = last.p.upstreams[u.name] || {};
    const was = before.d.upstreams.find((x) => x.name === u.name);
    const retries = was ? (u.totals.retries - was.totals.retries) * perMin : null;
    // Attempts, not requests: a failure that failed over is the upstream's
    // failure, though the request it belonged to succeeded elsewhere.
    const ok = was ? u.totals.ok - was.totals.ok : 0;
    const attemptsOk = was ? ratio(ok, ok + u.totals.failed - was.totals.failed) : null;
    const host = admin && d.admin.hosts[u.name];
    const actions = h("div", { class: "actions" },
      h("button", { type: "button", "data-action": "reset", onclick: () => act(`/admin/upstreams/${encodeURIComponent(u.name)}/reset`, `Close the breaker of ${u.name} and clear its 429 cooldown?`) }, "Reset"),
      h("button", { type: "button", "data-action": "open", onclick: () => act(`/admin/upstreams/${encodeURIComponent(u.name)}/open`, `Force ${u.name} open? It takes no traffic until reset.`) }, "Force open"));
    const cooling = u.cooldown_remaining_seconds > 0;
    return h("tr", { "data-upstream": u.name },
      h("td", {}, h("strong", {}, u.name), host ? h("div", { class: "why" }, host) : null),
      h("td", {},
        h("span", { class: "badge state", "data-state": u.breaker.state }, STATE_TEXT[u.breaker.state] || u.breaker.state),
        breakerText(u).filter(Boolean).map((t) => h("div", { class: "why" }, t)),
        strip(u.name)),
      h("td", {},
        h("div", {}, `${pct(attemptsOk)} of attempts`, h("span", { class: "muted" }, " (1 min)")),
        h("div", { class: "why" }, `${pct(u.window.success_rate)} of requests answered (5 min)`),
        spark([(x) => (x.upstreams[u.name] || {}).success], `${u.name} attempt success per 2 s`)),
      h("td", {}, quantiles(u.window.latency_ms), spark([(x) => (x.upstreams[u.name] || {}).p95], `${u.name} p95 latency per 2 s, ms`)),
      h("td", {}, u.window.ttft_ms ? `${ms(u.window.ttft_ms.p50)} / ${ms(u.window.ttft_ms.p95)}` : "–"),
      h("td", { title: u.in_flight == null ? "counted when max_concurrency is set" : null },
        u.in_flight == null ? "–" : `${u.in_flight} / ${u.max_concurrency}`),
      h("td", {}, `${rate(p.aps)}/s · ${rate(retries)}/min`),
      h("td", { class: cooling ? "warn" : null }, cooling ? `cooling, ${dur(u.cooldown_remaining_seconds)} left` : "none"),
      h("td", { class: "admin-only" }, admin ? actions : null));
  });
  $("#upstream-table tbody").replaceChildren(...rows);
}

function renderModels(d) {
  const last = ring[ring.length - 1];
  const before = minuteAgo();
  const perMin = 60000 / Math.max(1, last.t - before.t);
  const rows = d.models.map((m) => {
    const was = before.d.models.find((x) => x.name === m.name);
    const t = m.totals, w = was ? was.totals : null;
    const diff = (f) => (w ? f(t) - f(w) : null);
    const served = Object.keys(t.requests_by_upstream).map((u) => [u, diff((x) => x.requests_by_upstream[u] || 0)]);
    const all = served.reduce((a, [, n]) => a + (n || 0), 0);
    const servedText = all > 0
      ? served.filter(([, n]) => n > 0).map(([u, n]) => `${u} ${pct(n / all)}`).join(" · ")
      : "no answers";
    const cost = diff((x) => x.cost_usd);
    return h("tr", { "data-model": m.name },
      h("td", {}, h("strong", {}, m.name),
        m.hedge_after ? h("div", { class: "why" }, `hedged after ${m.hedge_after}`) : null,
        m.shadowed ? h("div", { class: "why" }, "shadowed") : null),
      h("td", {}, h("ol", {}, m.targets.map((x) => h("li", {}, `${x.upstream} → ${x.model}`, h("span", { class: "muted" }, ` (priority ${x.priority}, weight ${x.weight})`))))),
      h("td", { title: "share of requests answered, last minute (cache: response cache hits)" }, servedText),
      h("td", {}, rate(w && diff((x) => x.requests) * perMin)),
      h("td", {}, pct(w && ratio(diff((x) => x.ok), diff((x) => x.eligible)))),
      h("td", {}, rate(w && diff((x) => x.failovers) * perMin)),
      h("td", {}, m.hedge_after ? rate(w && diff((x) => x.hedges) * perMin) : "not hedged"),
      h("td", {}, usd(cost == null ? null : cost * perMin * 60)));
  });
  $("#model-table tbody").replaceChildren(...rows);
}

function renderRateLimits(d) {
  const before = minuteAgo();
  const last = ring[ring.length - 1];
  const perMin = 60000 / Math.max(1, last.t - before.t);
  return d.rate_limits.map((r) => {
    const was = (before.d.rate_limits || []).find((x) => x.name === r.name);
    const limit = [r.requests_per_minute && `${r.requests_per_minute} req/min`, r.tokens_per_minute && `${r.tokens_per_minute} tokens/min`]
      .filter(Boolean).join(", ") + (r.queues ? " (queues)" : "");
    return h("tr", { "data-rule": r.name }, h("td", {}, r.name), h("td", {}, r.match ? `${r.scope} = ${r.match}` : r.scope), h("td", {}, limit),
      h("td", { class: r.rejected > 0 ? "warn" : null }, String(r.rejected)), h("td", {}, rate(was ? (r.rejected - was.rejected) * perMin : null)));
  });
}

function renderShadow(d) {
  return d.shadow.map((x) => h("tr", {},
    h("td", {}, x.model), h("td", {}, `${x.upstream} → ${x.upstream_model}`), h("td", {}, pct(x.sample)),
    h("td", {}, String(x.totals.requests)), h("td", {}, pct(ratio(x.totals.ok, x.totals.requests))),
    h("td", {}, String(x.totals.dropped)), h("td", {}, usd(x.totals.cost_usd))));
}

function renderComparison(d) {
  return d.admin.comparison.flatMap((m) => ["primary", "shadow"].map((side) => {
    const r = m[side];
    return h("tr", {}, h("td", {}, side === "primary" ? m.model : ""), h("td", {}, side), h("td", {}, String(r.requests)),
      h("td", {}, pct(r.success_rate)), h("td", {}, `${ms(r.latency_ms_p50)} / ${ms(r.latency_ms_p95)}`),
      h("td", {}, usd(r.usd_per_1k_requests)),
      h("td", {}, side === "primary" ? `${pct(m.exact_match_rate)} of ${m.deterministic_pairs}` : ""));
  }));
}

function renderCache(d) {
  const before = minuteAgo();
  const last = ring[ring.length - 1];
  const perMin = 60000 / Math.max(1, last.t - before.t);
  const size = d.cache.entries == null ? "" : ` · ${d.cache.entries} entries, ${(d.cache.bytes / 1048576).toFixed(1)} MiB`;
  $("#cache-meta").textContent = `${d.cache.backend}${size}`;
  return d.cache.models.map((m) => {
    const was = ((before.d.cache || {}).models || []).find((x) => x.model === m.model);
    const t = m.totals, w = was ? was.totals : null;
    const diff = (k) => (w ? t[k] - w[k] : null);
    const lookups = (x) => x.hit + x.miss;
    const minuteRatio = w ? ratio(diff("hit"), lookups(t) - lookups(w)) : null;
    return h("tr", { "data-cache-model": m.model }, h("td", {}, m.model),
      h("td", {}, pct(minuteRatio)), h("td", {}, pct(ratio(t.hit, lookups(t)))),
      h("td", {}, rate(w && diff("hit") * perMin)),
      h("td", {}, usd(w ? diff("saved_usd") * perMin * 60 : null)), h("td", {}, usd(t.saved_usd)),
      h("td", {}, `${t.stored} / ${t.not_stored}`), h("td", {}, `${t.bypass} / ${t.refresh}`));
  });
}

function renderBudgets(d) {
  return d.budgets.flatMap((b) => {
    const head = `${b.name}` + (b.match ? ` (${b.scope} = ${b.match})` : ` (${b.scope})`);
    const resets = b.resets_at ? new Date(b.resets_at).toLocaleString() : "never (total)";
    const mode = b.on_exceed === "reject" ? "rejects" : "warns";
    const rows = b.buckets.length ? b.buckets : [{ name: b.buckets_hidden ? "per key: admin only" : "nothing spent yet", spent_usd: null, reserved_usd: null }];
    return rows.map((k, i) => {
      const used = k.spent_usd == null ? null : (k.spent_usd + k.reserved_usd) / b.limit_usd;
      return h("tr", { "data-budget": b.name },
        h("td", {}, i === 0 ? head : ""), h("td", {}, k.name),
        h("td", { class: used != null && used >= 1 ? "bad" : used != null && used >= 0.8 ? "warn" : null },
          k.spent_usd == null ? "–" : `${usd(k.spent_usd)} of ${usd(b.limit_usd)} (${pct(used)})`),
        h("td", {}, k.reserved_usd == null ? "–" : usd(k.reserved_usd)),
        h("td", {}, `${b.period}, resets ${resets}`), h("td", {}, mode));
    });
  });
}

function renderRouting(d) {
  const before = minuteAgo();
  const last = ring[ring.length - 1];
  const perMin = 60000 / Math.max(1, last.t - before.t);
  return d.routing.flatMap((m) => {
    const was = ((before.d.routing || []).find((x) => x.model === m.model) || { targets: [] }).targets;
    const diffs = m.targets.map((t) => {
      const w = was.find((x) => x.upstream === t.upstream);
      return w ? t.picks - w.picks : null;
    });
    const all = diffs.reduce((a, n) => a + (n || 0), 0);
    return m.targets.map((t, i) => h("tr", { "data-route": `${m.model}/${t.upstream}` },
      h("td", {}, i === 0 ? m.model : ""), h("td", {}, i === 0 ? m.strategy : ""),
      h("td", {}, `${t.upstream} → ${t.model}`), h("td", {}, ms(t.estimate_seconds * 1000)),
      h("td", {}, t.state), h("td", {}, String(t.in_flight)),
      h("td", {}, all > 0 ? `${pct(diffs[i] / all)} · ${rate(diffs[i] * perMin)}/min` : "–")));
  });
}

// Optional panels: each shows only when its section is in the JSON (a
// feature that is off, or not built yet, has no section and no panel).
// A new panel adds its <section id> and a renderer here.
const PANELS = [
  ["rate_limits", (d) => d.rate_limits, renderRateLimits],
  ["shadow", (d) => d.shadow, renderShadow],
  ["cache", (d) => d.cache && d.cache.models.length && d.cache, renderCache],
  ["budgets", (d) => d.budgets, renderBudgets],
  ["routing", (d) => d.routing, renderRouting],
  ["comparison", (d) => d.admin && d.admin.comparison.length && d.admin.comparison, renderComparison],
  ["keys", (d) => d.admin, (d) => (d.admin.keys.length
    ? d.admin.keys.map((k) => h("li", {}, k))
    : [h("li", {}, "no [[keys]] configured: any client key is accepted")])],
];

function render(d) {
  const admin = !!d.admin;
  document.body.classList.toggle("admin", admin);
  const health = $("#health");
  health.dataset.state = d.status;
  health.textContent = d.status;
  $("#meta").textContent = `v${d.version} · up ${dur(d.uptime_ms / 1000)} · updated ${new Date().toLocaleTimeString()}`;
  $("#unlock").hidden = !d.admin_enabled || admin;
  $("#locked").hidden = !admin;
  renderOverall(d);
  renderUpstreams(d, admin);
  renderModels(d);
  for (const [id, present, draw] of PANELS) {
    const section = document.getElementById(id);
    const on = !!present(d);
    section.hidden = !on;
    if (on) $("tbody, ul", section).replaceChildren(...draw(d));
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

function notice(text) {
  $("#notice").textContent = text;
}

async function poll() {
  let r = await fetch("/status.json", { headers: headers(), cache: "no-store" });
  if (r.status === 403 && sessionStorage.getItem(KEY)) {
    sessionStorage.removeItem(KEY);
    notice("That admin key was refused.");
    r = await fetch("/status.json", { cache: "no-store" });
  }
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  const d = await r.json();
  ingest(d);
  render(d);
  polls += 1;
  document.body.dataset.polls = String(polls);
}

// One poll at a time; the next one 2 s after the last ended.
function pollNow() {
  clearTimeout(timer);
  if (running) return;
  running = poll()
    .then(() => { $("#conn").textContent = ""; })
    .catch((e) => { $("#conn").textContent = `no answer from relaygate (${e.message}); retrying`; })
    .finally(() => { running = null; timer = setTimeout(pollNow, POLL_MS); });
}

async function act(path, question) {
  if (!confirm(question)) return;
  try {
    const r = await fetch(path, { method: "POST", headers: headers(), cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    notice(r.ok ? `Done: ${path}` : `Refused (${r.status}): ${(body.error && body.error.message) || "unknown error"}`);
  } catch (e) {
    notice(`Failed: ${e.message}`);
  }
  pollNow();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#unlock").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("#key");
    if (input.value) sessionStorage.setItem(KEY, input.value);
    input.value = "";
    notice("");
    pollNow();
  });
  $("#lock").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    pollNow();
  });
  $("#reload").addEventListener("click", () => act("/admin/reload", "Reload the config file now?"));
  pollNow();
});
