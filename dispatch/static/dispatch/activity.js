// hal0web Activity page: per-slot charts over the last 15 minutes and the latest requests,
// seeded from the request log (the page's JSON) and kept live by the decision events.
const uPlot = window.uPlot; // the vendored browser build (no ES module build exists)

const $ = (id) => document.getElementById(id);
const seed = JSON.parse($("seed").textContent);
const root = $("activity");
const chartsBox = $("charts");
const tbody = document.querySelector("#requests tbody");
const filterBox = $("filter");
const liveBadge = $("live");
const missedNote = $("missed");

const STEP_S = 10; // one point per 10 seconds
const WINDOW_S = seed.window_s;
const TABLE_SIZE = 200;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
// As the chat page (app.js): a close with LIVE_PAUSED means the server's Redis is away.
const LIVE_PAUSED = 4503;
const PAUSED_RETRY_MS = 2000;
const PAUSED = "live updates paused";
// The server's clock, not the browser's: request times come from the server.
const clockSkew = seed.now - Date.now() / 1000;
const now = () => Date.now() / 1000 + clockSkew;

const perSlot = new Map(); // slot -> Map(bucket start -> {n, errors, tokens, ttfts})
const charts = new Map(); // slot -> {plot, card}
const rows = []; // newest first, at most TABLE_SIZE

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

// ---- the numbers -----------------------------------------------------------------------------

function add(ev) {
  const slot = ev.slot ?? "(no slot)";
  if (!perSlot.has(slot)) perSlot.set(slot, new Map());
  const buckets = perSlot.get(slot);
  const start = Math.floor(ev.at / STEP_S) * STEP_S;
  let b = buckets.get(start);
  if (!b) buckets.set(start, (b = { n: 0, errors: 0, tokens: 0, ttfts: [] }));
  b.n += 1;
  if (ev.status >= 400 || ev.error) b.errors += 1;
  b.tokens += ev.completion_tokens ?? 0;
  // A JSON (not streamed) answer's first token reaches the client with the whole answer.
  const ttft = ev.ttft_ms ?? (ev.status < 400 ? ev.duration_ms : null);
  if (ttft !== null && ttft !== undefined) b.ttfts.push(ttft);
}

function series(slot) {
  const buckets = perSlot.get(slot);
  const end = Math.floor(now() / STEP_S) * STEP_S;
  const first = end - WINDOW_S + STEP_S;
  const xs = [], rps = [], eps = [], tps = [], p50 = [], p95 = [];
  let total = 0;
  for (const start of [...buckets.keys()]) if (start < first) buckets.delete(start); // out of the window
  for (let t = first; t <= end; t += STEP_S) {
    const b = buckets.get(t);
    xs.push(t);
    rps.push(b ? b.n / STEP_S : 0);
    eps.push(b ? b.errors / STEP_S : 0);
    tps.push(b ? b.tokens / STEP_S : 0);
    const sorted = b ? [...b.ttfts].sort((x, y) => x - y) : [];
    p50.push(quantile(sorted, 0.5));
    p95.push(quantile(sorted, 0.95));
    total += b ? b.n : 0;
  }
  return { data: [xs, rps, eps, tps, p50, p95], total };
}

// ---- the charts ------------------------------------------------------------------------------

function chartWidth() {
  return Math.max(280, Math.min(chartsBox.clientWidth - 24, 560));
}

function makeChart(slot) {
  const card = h("article", { className: "chart", dataset: { slot, requests: "0" } }, h("h3", {}, slot));
  chartsBox.append(card);
  const opts = {
    width: chartWidth(),
    height: 200,
    scales: { x: { time: true }, ms: { auto: true } },
    series: [
      {},
      { label: "req/s", stroke: "#3559d6", width: 2 },
      { label: "errors/s", stroke: "#c0352b", width: 2 },
      { label: "tok/s", stroke: "#1f8a4c", width: 2 },
      { label: "TTFT p50 ms", stroke: "#b26b00", scale: "ms", spanGaps: true },
      { label: "TTFT p95 ms", stroke: "#8a4fd6", scale: "ms", dash: [4, 4], spanGaps: true },
    ],
    axes: [{}, { scale: "y" }, { scale: "ms", side: 1, grid: { show: false } }],
  };
  const { data } = series(slot);
  const plot = new uPlot(opts, data, card);
  charts.set(slot, { plot, card });
}

function redraw() {
  for (const slot of [...perSlot.keys()].sort()) {
    if (!charts.has(slot)) makeChart(slot);
    const { plot, card } = charts.get(slot);
    const { data, total } = series(slot);
    plot.setData(data);
    card.dataset.requests = String(total);
  }
}

// ---- the table -------------------------------------------------------------------------------

function rowFor(ev) {
  const failed = ev.status >= 400 || ev.error;
  const text = (v) => (v === null || v === undefined ? "–" : String(v));
  const tr = h(
    "tr",
    { className: failed ? "failed" : "", dataset: { requestId: ev.request_id, slot: ev.slot ?? "" } },
    h("td", {}, new Date((ev.at - clockSkew) * 1000).toLocaleTimeString()),
    h("td", {}, text(ev.slot)),
    h("td", {}, text(ev.model)),
    h("td", {}, ev.error ? `${ev.status} ${ev.error}` : String(ev.status)),
    h("td", {}, String(Math.round(ev.duration_ms))),
    h("td", {}, ev.ttft_ms === null || ev.ttft_ms === undefined ? "–" : String(Math.round(ev.ttft_ms))),
    h("td", { className: "why" }, text(ev.why?.text)),
    h("td", {}, h("code", {}, ev.request_id)),
  );
  tr.dataset.search = tr.textContent.toLowerCase();
  return tr;
}

function applyFilter(tr) {
  const words = filterBox.value.toLowerCase().split(/\s+/).filter(Boolean);
  tr.hidden = !words.every((w) => tr.dataset.search.includes(w));
}

function addRow(ev) {
  const tr = rowFor(ev);
  applyFilter(tr);
  rows.unshift(tr);
  tbody.prepend(tr);
  while (rows.length > TABLE_SIZE) rows.pop().remove();
}

filterBox.addEventListener("input", () => rows.forEach(applyFilter));

// ---- live ------------------------------------------------------------------------------------

// Events come in batches (a few a second), each saying how many events this page missed
// before it: the charts are drawn once per batch, and what was missed is counted and shown.
let missed = 0;

function onEvent(ev) {
  if (ev.type === "batch") {
    for (const one of ev.events) {
      if (one.type === "dispatch.decision") {
        add(one);
        addRow(one);
      }
    }
    if (ev.missed) {
      missed += ev.missed;
      missedNote.textContent = `${missed} events missed`;
      missedNote.hidden = false;
    }
    redraw();
  } else if (ev.type === "snapshot") {
    // Every slot gets a chart, even one with no traffic yet.
    for (const slot of ev.slots) if (!perSlot.has(slot.name)) perSlot.set(slot.name, new Map());
    redraw();
    if (ev.paused) setLive("paused", `${PAUSED} (the server's Redis is away)`);
    else setLive("live", "live");
  }
}

function setLive(state, text) {
  liveBadge.dataset.live = state;
  liveBadge.textContent = text;
}

let backoff = BACKOFF_MIN_MS;

function connect() {
  const url = new URL(root.dataset.ws, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  // "live" once the snapshot is in: it says whether updates follow (see onEvent).
  socket.addEventListener("open", () => {
    backoff = BACKOFF_MIN_MS;
  });
  socket.addEventListener("message", (e) => onEvent(JSON.parse(e.data)));
  socket.addEventListener("close", (e) => {
    if (e.code === LIVE_PAUSED) {
      setLive("paused", `${PAUSED}: reconnecting…`);
      setTimeout(connect, PAUSED_RETRY_MS * (0.5 + Math.random() / 2));
      return;
    }
    const wait = backoff * (0.5 + Math.random() / 2);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setLive("down", `reconnecting in ${Math.ceil(wait / 1000)} s…`);
    setTimeout(connect, wait);
  });
}

for (const ev of seed.requests) {
  add(ev);
  addRow(ev);
}
redraw();
setInterval(redraw, 2000); // the window slides even when nothing happens
window.addEventListener("resize", () => {
  for (const { plot } of charts.values()) plot.setSize({ width: chartWidth(), height: 200 });
});
connect();
