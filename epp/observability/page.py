"""The live pool page served at ``/debug``: plain HTML and JavaScript, no build step, no outside assets.

It polls ``/debug/endpoints`` and ``/debug/decisions`` every second and redraws. Element ids
(``state``, ``streams``, ``decisions-total``, rows ``data-endpoint=<name>``) are stable for tests.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EPP pool</title>
<style>
  :root { --bg:#0f172a; --panel:#111c33; --fg:#e2e8f0; --dim:#94a3b8; --acc:#38bdf8; --ok:#22c55e;
          --warn:#f59e0b; --bad:#ef4444; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--fg); font:14px/1.4 system-ui, sans-serif; }
  header { display:flex; flex-wrap:wrap; gap:18px; align-items:baseline; padding:14px 20px;
           background:var(--panel); border-bottom:1px solid #1e293b; }
  h1 { font-size:18px; margin:0; }
  h2 { font-size:15px; margin:18px 20px 8px; color:var(--dim); font-weight:600; }
  .stat b { font-size:18px; margin-left:4px; }
  .badge { padding:2px 10px; border-radius:10px; font-weight:700; text-transform:uppercase; font-size:12px; }
  .serving { background:var(--ok); color:#04130a; } .draining { background:var(--warn); color:#1a1002; }
  .starting, .unknown, .down { background:var(--bad); color:#fff; }
  table { border-collapse:collapse; margin:0 20px; width:calc(100% - 40px); }
  th, td { text-align:left; padding:5px 8px; border-bottom:1px solid #1e293b; white-space:nowrap; }
  th { color:var(--dim); font-weight:600; font-size:12px; }
  td.num { text-align:right; font-variant-numeric:tabular-nums; }
  .bar { position:relative; height:12px; width:120px; background:#1e293b; border-radius:3px; overflow:hidden;
         display:inline-block; vertical-align:middle; }
  .bar > i { position:absolute; left:0; top:0; bottom:0; background:var(--acc); }
  .err { color:var(--bad); } .dim { color:var(--dim); } .stale { color:var(--warn); }
  footer { margin:16px 20px; color:var(--dim); font-size:12px; }
</style>
</head>
<body>
<header>
  <h1>EPP &mdash; pool <span id="pool">?</span></h1>
  <span class="badge unknown" id="state">loading</span>
  <span class="stat">streams<b id="streams">0</b></span>
  <span class="stat">decisions<b id="decisions-total">0</b></span>
  <span class="stat">rejected<b id="rejected">0</b></span>
  <span class="stat">config<b id="config">-</b></span>
  <span class="stat dim" id="updated"></span>
</header>
<h2>Endpoints</h2>
<table>
  <thead><tr><th>endpoint</th><th>address</th><th>waiting</th><th>running</th><th>KV cache</th>
    <th>in flight</th><th>picks</th><th>share</th><th>metrics age</th><th>last error</th></tr></thead>
  <tbody id="endpoints"><tr><td colspan="10" class="dim">loading&hellip;</td></tr></tbody>
</table>
<h2>Recent decisions</h2>
<table>
  <thead><tr><th>time</th><th>request</th><th>model</th><th>endpoint</th><th>scheduling</th><th>margin</th>
    <th>status</th><th>duration</th></tr></thead>
  <tbody id="decisions"></tbody>
</table>
<footer>Refreshed every second from <a href="debug/endpoints" style="color:var(--acc)">/debug/endpoints</a> and
  <a href="debug/decisions" style="color:var(--acc)">/debug/decisions</a>; Prometheus at
  <a href="metrics" style="color:var(--acc)">/metrics</a>.</footer>
<script>
"use strict";
const base = location.pathname.replace(/\\/debug\\/?$/, "/").replace(/\\/?$/, "/");
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function num(v, digits) {
  if (v === null || v === undefined) return "-";
  return digits === undefined ? String(v) : Number(v).toFixed(digits);
}
function bar(frac) {
  const b = el("span", null, "bar"), i = el("i");
  i.style.width = Math.max(0, Math.min(1, frac)) * 100 + "%";
  b.appendChild(i);
  return b;
}
function renderEndpoints(d) {
  document.getElementById("pool").textContent = d.pool;
  const st = document.getElementById("state");
  st.textContent = d.state; st.className = "badge " + d.state;
  document.getElementById("streams").textContent = d.streams;
  document.getElementById("decisions-total").textContent = d.decisions;
  document.getElementById("rejected").textContent = d.rejected;
  document.getElementById("config").textContent = d.config.generation ? "gen " + d.config.generation : "static";
  const total = d.endpoints.reduce((a, e) => a + e.picks, 0) || 1;
  const body = document.getElementById("endpoints");
  body.replaceChildren();
  for (const e of d.endpoints) {
    const tr = el("tr");
    tr.dataset.endpoint = e.name;
    tr.appendChild(el("td", e.pool ? e.pool + " / " + e.name : e.name));  // several pools: each labelled
    tr.appendChild(el("td", e.address, "dim"));
    tr.appendChild(el("td", e.waiting, "num"));
    tr.appendChild(el("td", e.running, "num"));
    const kv = el("td");
    kv.appendChild(bar(e.kv_cache));
    kv.appendChild(el("span", " " + num(e.kv_cache * 100, 0) + "%"));
    tr.appendChild(kv);
    tr.appendChild(el("td", e.inflight, "num"));
    tr.appendChild(el("td", e.picks, "num picks"));
    const share = el("td"); share.appendChild(bar(e.picks / total)); tr.appendChild(share);
    tr.appendChild(el("td", e.metrics_age_s === null ? "never" : num(e.metrics_age_s, 2) + " s",
                      e.stale ? "num stale" : "num"));
    tr.appendChild(el("td", e.last_error || "", "err"));
    body.appendChild(tr);
  }
  if (!d.endpoints.length) body.appendChild(el("tr")).appendChild(el("td", "no endpoints", "dim"));
}
function renderDecisions(d) {
  const body = document.getElementById("decisions");
  body.replaceChildren();
  for (const r of d.decisions.slice(0, 25)) {
    const tr = el("tr");
    tr.appendChild(el("td", new Date(r.t * 1000).toLocaleTimeString(), "dim"));
    tr.appendChild(el("td", (r.id || "-").slice(0, 13)));
    tr.appendChild(el("td", r.model || "-"));
    tr.appendChild(el("td", (r.pool ? r.pool + " / " : "") + (r.rejected ? "rejected: " + r.rejected : r.endpoint),
                      r.rejected ? "err" : ""));
    tr.appendChild(el("td", r.sched_us === undefined ? "-" : num(r.sched_us, 0) + " \\u00b5s", "num"));
    tr.appendChild(el("td", r.margin === undefined || r.margin === null ? "-" : num(r.margin, 3), "num"));
    tr.appendChild(el("td", r.status === undefined ? "in flight" : r.status,
                      r.failed || (r.status >= 400) ? "num err" : "num"));
    tr.appendChild(el("td", r.duration_s === undefined || r.duration_s === null ? "-" : num(r.duration_s, 2) + " s",
                      "num"));
    body.appendChild(tr);
  }
}
async function refresh() {
  try {
    const [e, d] = await Promise.all([
      fetch(base + "debug/endpoints", {cache: "no-store"}).then(r => r.json()),
      fetch(base + "debug/decisions?limit=25", {cache: "no-store"}).then(r => r.json())]);
    renderEndpoints(e);
    renderDecisions(d);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    const st = document.getElementById("state");
    st.textContent = "unreachable"; st.className = "badge down";
  } finally {
    setTimeout(refresh, 1000);
  }
}
refresh();
</script>
</body>
</html>
"""
