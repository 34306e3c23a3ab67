// hal0web chat page: a slot picker kept live over the WebSocket, streaming chat through
// /v1/chat/completions, and a side panel of slot cards and recent routing decisions. Each
// model shows where it is (loaded, loading 40 %, unloaded, failed) and what choosing it would
// unload; each slot what its loader is doing and who waits; staff get buttons to drain a slot
// and to load, unload and pin its models.

const $ = (id) => document.getElementById(id);
const app = $("app");
// The vendored libraries, at the URLs the page names ({% static %}: hashed in production).
// Not an import map: that is an inline script, which the Content-Security-Policy refuses.
const [{ marked }, { default: DOMPurify }] = await Promise.all([
  import(app.dataset.marked),
  import(app.dataset.dompurify),
]);
const picker = $("model");
const composer = $("composer");
const promptBox = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const messagesList = $("messages");
const slotsPanel = $("slots");
const logList = $("log");
const liveBadge = $("live");
const missedNote = $("missed");
const modelNote = $("model-note");
// The staff buttons' endpoint (dispatch/web/operator.py): staff pages only are given it.
const controlUrl = app.dataset.control ?? null;

const STORE_KEY = "hal0.model";
const LOG_SIZE = 50;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
// The server closes with LIVE_PAUSED when its live feed cannot run (Redis away: routing goes
// on, the page hears nothing); it is asked again about every PAUSED_RETRY_MS, not backed off.
const LIVE_PAUSED = 4503;
const PAUSED_RETRY_MS = 2000;
const PAUSED = "live updates paused";

const slots = new Map(); // slot name -> the server's latest payload for it
let tableVersion = 0;
// Whether the watcher keeps slot state fresh; when not, no badge may claim a state.
let watcher = { stale: false, probed_at: null };
// The server's states (dispatch/routing/states.py), from the snapshot that comes before any
// slot: the badge a stale watcher leaves, why a slot in each unusable state cannot take a
// request, and the tone (ok, warn, bad) each is shown in.
let states = null;
// The model load states' words and tones, and the word for a drained slot (the snapshot's).
let loads = { names: [], servable: [], tones: {}, drained: "" };
// The leading loader's latest word per slot: what it loads and evicts, who waits, in order.
const queues = new Map(); // slot name -> its last `queue` event
const notes = new Map(); // slot name -> {text, failed}: what the last staff button did
// The request this page is waiting on, until its first token: its queue line shows meanwhile.
let pending = null;
const conversation = []; // the {role, content} turns sent with every request
// Why this slot: the live decision event carries each request's explanation. It may come
// before or after the page has its answer's request id, so both sides wait for the other.
const WHY_KEEP = 200;
const whyById = new Map(); // request id -> explanation text, the latest WHY_KEEP
const waitingWhy = new Map(); // request id -> the answer that shows it
let running = null; // AbortController of the request in flight, if any

// ---- rendering helpers ---------------------------------------------------------------------

// Build an element; children are nodes or strings (strings become text, never markup).
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== ""));
  return node;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// A model's raw HTML is shown as the text it is, never parsed; DOMPurify then removes whatever
// else unsafe the markdown itself could produce (javascript: links and the like).
marked.use({
  gfm: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["img", "style", "form"] });
}

function sortedSlots() {
  return [...slots.values()].sort((a, b) => a.name.localeCompare(b.name));
}

// Null when the slot's models can be chosen, else why not.
function unusable(slot) {
  const why = states.unusable[slot.state];
  if (why) {
    const detail = slot.last_error ? `: ${slot.last_error}` : "";
    return `${slot.name} ${why}${detail}`;
  }
  // The page talks to /v1/chat/completions: a slot that does not serve it (natively or
  // translated) cannot answer here.
  if (!(slot.serves ?? {})["chat/completions"]) {
    return `${slot.name} (${slot.type}) does not serve chat/completions`;
  }
  return null;
}

// ---- the model picker ----------------------------------------------------------------------

const percent = (progress) => `${Math.round(progress * 100)} %`;

// A model's load state in a few words: "loaded", "loading 40 %", "failed".
function loadLabel(model) {
  return model.progress === null || model.progress === undefined
    ? model.load
    : `${model.load} ${percent(model.progress)}`;
}

// What choosing the model would do first, in words (null: nothing to say).
function evictionPreview(model) {
  return model.would_unload ? `choosing ${model.id} unloads ${model.would_unload}` : null;
}

// Each slot's group and options as the picker shows them, from the slots' payloads.
function pickerModel() {
  return sortedSlots().map((slot) => {
    const reason = unusable(slot);
    return {
      slot: slot.name,
      state: slot.state,
      label: `${slot.name} · ${slot.state}`,
      // An alias pattern (claude-haiku-*) names models, it is none: the card shows it.
      options: slot.models.filter((model) => !model.pattern).map((model) => {
        const name = model.source === "alias" ? `${model.id} → ${model.upstream}` : model.id;
        const details = [
          `${slot.name} · ${model.source}`,
          model.load_error ? `${model.load}: ${model.load_error}` : null,
          evictionPreview(model),
        ];
        return {
          value: `${slot.name}/${model.id}`,
          text: `${model.default ? `${name} (default)` : name} · ${loadLabel(model)}`,
          disabled: reason !== null,
          title: reason ?? details.filter(Boolean).join(" · "),
          load: model.load,
        };
      }),
    };
  });
}

let pickerShows = ""; // the groups and options the picker was last built with

function renderPicker() {
  const groups = pickerModel();
  // Rebuilding closes a dropdown the user has open: only when groups or options come or go or
  // change their state; a new label (a load's progress) is written into the options in place.
  const shows = JSON.stringify(
    groups.map((g) => [g.slot, g.state, g.options.map((o) => [o.value, o.disabled])]),
  );
  if (shows !== pickerShows) {
    pickerShows = shows;
    rebuildPicker(groups);
  } else {
    const byValue = new Map([...picker.options].map((o) => [o.value, o]));
    for (const group of groups) {
      for (const o of group.options) {
        const option = byValue.get(o.value);
        if (option.text !== o.text) option.text = o.text;
        if (option.title !== o.title) option.title = o.title;
        option.dataset.load = o.load;
      }
    }
  }
  renderModelNote();
}

function rebuildPicker(groups) {
  const wanted = localStorage.getItem(STORE_KEY) || picker.value;
  picker.replaceChildren(
    ...groups.map((g) => {
      const group = h("optgroup", { label: g.label, dataset: { slot: g.slot, state: g.state } });
      for (const o of g.options) {
        const option = new Option(o.text, o.value);
        option.disabled = o.disabled;
        option.title = o.title;
        option.dataset.load = o.load;
        group.append(option);
      }
      return group;
    }),
  );
  // Keep the user's choice even while its slot is unusable (it comes back when the slot
  // does); only a choice that no longer exists falls back to the first usable model.
  const options = [...picker.options];
  const keep = options.find((o) => o.value === wanted);
  const fallback = options.find((o) => !o.disabled);
  picker.value = (keep ?? fallback ?? { value: "" }).value;
}

// The chosen model: its slot's payload and its own, or nulls.
function chosen() {
  const [name, ...rest] = picker.value.split("/");
  const slot = slots.get(name);
  const model = slot?.models.find((m) => m.id === rest.join("/"));
  return { slot: slot ?? null, model: model ?? null };
}

// Under the picker: what choosing the model would unload, or why its last load failed.
function renderModelNote() {
  const { model } = chosen();
  const text = !model
    ? ""
    : evictionPreview(model) ?? (model.load_error ? `${model.id} ${model.load}: ${model.load_error}` : "");
  if (modelNote.textContent !== text) modelNote.textContent = text;
}

picker.addEventListener("change", () => {
  localStorage.setItem(STORE_KEY, picker.value);
  renderModelNote();
});

// ---- the side panel ------------------------------------------------------------------------

// The slot's state as its badge says it: a draining slot counts what it still has in flight,
// and reads "drained" once nothing is left.
function badgeText(slot, state) {
  if (!slot.drain || watcher.stale) return state;
  return slot.inflight > 0 ? `${state} (${slot.inflight} in flight)` : loads.drained;
}

// A staff button; the click is handled once for the whole panel (see `control`).
function controlButton(text, label, data) {
  return h("button", { type: "button", className: "control", ariaLabel: label, dataset: data }, text);
}

function modelItem(slot, m) {
  const alias = m.source === "alias";
  const item = h(
    "li",
    { dataset: { model: m.id, load: m.load } },
    h("code", {}, m.id),
    m.default ? " default" : "",
    alias ? ` → ${m.upstream}` : "",
    m.pattern ? " (pattern)" : "",
    m.source === "discovered" ? " (discovered)" : "",
    // An alias is its model: its state is that model's, shown there.
    alias
      ? null
      : h(
          "span",
          { className: `load tone-${loads.tones[m.load] ?? "none"}`, title: m.load_error ?? "" },
          ` · ${loadLabel(m)}${m.load_error ? `: ${m.load_error}` : ""}`,
        ),
    m.pinned && !alias ? h("span", { className: "pinned" }, " · pinned") : null,
  );
  if (controlUrl && !alias) {
    const data = { slot: slot.name, model: m.id };
    const buttons = [];
    if (slot.loads_models) {
      const loaded = loads.servable.includes(m.load);
      const action = loaded ? "unload" : "load";
      buttons.push(controlButton(loaded ? "Unload" : "Load", `${loaded ? "Unload" : "Load"} ${m.id}`, { ...data, action }));
    }
    const pin = m.pinned ? "unpin" : "pin";
    buttons.push(controlButton(m.pinned ? "Unpin" : "Pin", `${m.pinned ? "Unpin" : "Pin"} ${m.id}`, { ...data, action: pin }));
    item.append(h("span", { className: "controls" }, ...buttons));
  }
  return item;
}

const ORDINALS = { one: "st", two: "nd", few: "rd", other: "th" };
const ordinalRules = new Intl.PluralRules("en", { type: "ordinal" });
const ordinal = (n) => `${n}${ORDINALS[ordinalRules.select(n)]}`;

// How long ago (the loader's clock; `at` is when it spoke, received `heardAt` here).
function waited(q, since) {
  const now = q.at + (performance.now() - q.heardAt) / 1000;
  return `${Math.max(0, Math.round(now - since))} s`;
}

// What the loader is doing for the slot: "loading gemma3 40 %", "evicting smollm2".
function loaderDoing(q) {
  const doing = [];
  if (q.loading) doing.push(`loading ${q.loading}${q.progress === null || q.progress === undefined ? "" : ` ${percent(q.progress)}`}`);
  if (q.evicting) doing.push(`evicting ${q.evicting}`);
  return doing;
}

// The slot's queue: what its loader does, and who waits, in order.
function queueBlock(slot) {
  const q = queues.get(slot.name);
  if (!q) return null;
  const counts = new Map();
  for (const w of q.queue) counts.set(w.model, (counts.get(w.model) ?? 0) + 1);
  const summary = [...counts].map(([model, n]) => `${model} ×${n}`).join(", ");
  return h(
    "div",
    { className: "queue", dataset: { slot: slot.name } },
    ...loaderDoing(q).map((line) => h("p", { className: "doing" }, line)),
    q.queue.length ? h("p", { className: "waiting" }, `queued: ${q.queue.length} (${summary})`) : null,
    q.queue.length
      ? h(
          "ol",
          { className: "waiters" },
          ...q.queue.map((w) => h("li", { dataset: { position: w.position } }, `${w.model} · ${waited(q, w.since)}`)),
        )
      : null,
  );
}

// What the slot serves, natively or translated by hal0web: "chat/completions, messages · translated".
function servesText(slot) {
  return Object.entries(slot.serves ?? {})
    .map(([endpoint, how]) => (how === "native" ? endpoint : `${endpoint} · ${how}`))
    .join(", ");
}

// Where what it speaks natively comes from.
function endpointsFrom(slot) {
  const speaks = (slot.endpoints ?? []).join(", ") || "nothing";
  const from = {
    manifest: "listed in its manifest",
    server: "as its server answered when asked",
  }[slot.endpoints_from] ?? `what a ${slot.kind} server speaks for type ${slot.type} (not asked yet)`;
  return `speaks ${speaks}: ${from}; the rest is translated by hal0web`;
}

function slotCard(slot) {
  const limit = slot.max_concurrency ? ` / ${slot.max_concurrency}` : "";
  const state = watcher.stale ? states.unknown : slot.state;
  const models = slot.models.map((m) => modelItem(slot, m));
  const note = notes.get(slot.name);
  const drained = slot.drain && slot.inflight === 0;
  return h(
    "article",
    {
      className: `slot state-${state} tone-${states.tones[state] ?? "none"}`,
      dataset: { slot: slot.name, state, ...(slot.drain ? { drained: String(drained) } : {}) },
    },
    h(
      "header",
      {},
      h("h3", {}, slot.name),
      h("span", { className: "badge" }, badgeText(slot, state)),
      controlUrl
        ? controlButton(slot.drain ? "Undrain" : "Drain", `${slot.drain ? "Undrain" : "Drain"} ${slot.name}`, {
            slot: slot.name,
            action: slot.drain ? "undrain" : "drain",
          })
        : null,
    ),
    h("p", { className: "meta" }, `${slot.kind} · ${slot.type} · in flight ${slot.inflight}${limit}`),
    h("ul", { className: "models" }, ...models),
    slot.model_limit ? h("p", { className: "limit" }, `keeps at most ${slot.model_limit} loaded`) : null,
    queueBlock(slot),
    h("p", { className: "endpoints", title: endpointsFrom(slot) }, `serves ${servesText(slot) || "nothing"}`),
    slot.drift.length
      ? h("p", { className: "warn" }, `Declared but not served by the upstream: ${slot.drift.join(", ")}`)
      : null,
    slot.last_error ? h("p", { className: "error" }, slot.last_error) : null,
    note ? h("p", { className: note.failed ? "note error" : "note", role: "status" }, note.text) : null,
  );
}

function staleNotice() {
  if (!watcher.stale) return null;
  const since = watcher.probed_at ? new Date(watcher.probed_at).toLocaleTimeString() : "start-up";
  return h("p", { className: "warn stale", role: "alert" }, `slot state unknown since ${since}`);
}

function renderSlots() {
  const cards = sortedSlots().map(slotCard);
  const notice = staleNotice();
  slotsPanel.replaceChildren(
    ...(notice ? [notice] : []),
    ...(cards.length ? cards : [h("p", { className: "empty" }, "No slots yet.")]),
  );
}

function noteWhy(ev) {
  const text = ev.why?.text;
  if (!text) return;
  const answer = waitingWhy.get(ev.request_id);
  if (answer) {
    waitingWhy.delete(ev.request_id);
    answer.why(text);
    return;
  }
  whyById.set(ev.request_id, text);
  while (whyById.size > WHY_KEEP) whyById.delete(whyById.keys().next().value);
}

function showWhy(requestId, answer) {
  if (!requestId) return;
  const text = whyById.get(requestId);
  if (text) {
    whyById.delete(requestId);
    answer.why(text);
  } else {
    waitingWhy.set(requestId, answer);
  }
}

function logDecision(ev) {
  const failed = ev.status >= 400 || ev.error;
  const why = ev.why?.text ? ` · ${ev.why.text}` : "";
  const item = h(
    "li",
    { className: failed ? "failed" : "", title: `${ev.request_id}${ev.error ? ` · ${ev.error}` : ""}${why}` },
    h("time", {}, new Date().toLocaleTimeString()),
    h("span", { className: "route" }, `${ev.model ?? "(no model)"} → ${ev.slot ?? "nowhere"}`),
    h("span", { className: "detail" },
      `${ev.resolution_path ?? "-"} · ${ev.status} · ${Math.round(ev.duration_ms)} ms`),
  );
  logList.prepend(item);
  while (logList.children.length > LOG_SIZE) logList.lastElementChild.remove();
}

function render() {
  renderPicker();
  renderSlots();
}

// ---- the loader's queue --------------------------------------------------------------------

function noteQueue(ev) {
  const held = queues.get(ev.slot);
  if (held && held.at > ev.at) return; // an older word than the one shown
  if (ev.loading || ev.evicting || ev.queue.length) {
    queues.set(ev.slot, { ...ev, heardAt: performance.now() });
  } else {
    queues.delete(ev.slot);
  }
}

// While anyone waits, the waits shown tick every second (only the queue blocks are redrawn).
setInterval(() => {
  if (pending) pending.show();
  for (const block of slotsPanel.querySelectorAll(".queue")) {
    const slot = slots.get(block.dataset.slot);
    const fresh = slot ? queueBlock(slot) : null;
    if (fresh) block.replaceWith(fresh);
  }
}, 1000);

// ---- the staff buttons ---------------------------------------------------------------------

async function control(button) {
  const { action, slot, model } = button.dataset;
  button.disabled = true;
  notes.set(slot, { text: `${button.ariaLabel}…`, failed: false });
  renderSlots();
  try {
    const response = await fetch(controlUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify({ action, slot, model }),
    });
    let body = {};
    try {
      body = await response.json();
    } catch {
      // not JSON (a proxy in between): the status has to do
    }
    notes.set(
      slot,
      response.ok
        ? { text: body.message ?? "done", failed: false }
        : { text: body.error?.message ?? `refused (${response.status})`, failed: true },
    );
  } catch (err) {
    notes.set(slot, { text: `${button.ariaLabel} failed: ${err.message}`, failed: true });
  }
  renderSlots();
}

slotsPanel.addEventListener("click", (e) => {
  const button = e.target.closest("button.control");
  if (button && controlUrl) control(button);
});

// ---- the WebSocket -------------------------------------------------------------------------

let backoff = BACKOFF_MIN_MS;

function setLive(state, text) {
  liveBadge.dataset.live = state;
  liveBadge.textContent = text;
}

// Table events carry the global state version they lead from and to. One older than what we
// hold is stale; one leading from a version after ours means we missed some: ask again.
function applicable(ev, socket) {
  if (ev.version < tableVersion) return false;
  if (ev.from_version > tableVersion) {
    socket.send(JSON.stringify({ type: "snapshot" }));
    return false;
  }
  tableVersion = ev.version;
  return true;
}

// The server sends events in batches (a few a second), each saying how many events this
// page missed before it: the count of what it did not hear is kept and shown, so a gap in the
// routing log is never silent.
let missed = 0;

function onMessage(ev, socket) {
  if (ev.type === "batch") {
    for (const one of ev.events) onEvent(one, socket);
    if (ev.missed) {
      missed += ev.missed;
      missedNote.textContent = `${missed} events missed`;
      missedNote.hidden = false;
    }
  } else {
    onEvent(ev, socket);
  }
}

function onEvent(ev, socket) {
  if (ev.type === "snapshot") {
    slots.clear();
    for (const slot of ev.slots) slots.set(slot.name, slot);
    tableVersion = ev.version;
    watcher = ev.watcher ?? watcher;
    states = ev.states ?? states;
    loads = ev.loads ?? loads;
    queues.clear();
    for (const q of ev.queues ?? []) noteQueue(q);
    pickerShows = ""; // the states' words may have changed with the server: rebuild
    render();
    pending?.show();
    if (ev.paused) setLive("paused", `${PAUSED} (the server's Redis is away)`);
    else setLive("live", "live");
  } else if (ev.type === "watcher") {
    watcher = ev;
    renderSlots();
  } else if (ev.type === "slot.state" || ev.type === "slot.models" || ev.type === "slot.updated") {
    if (!applicable(ev, socket)) return;
    slots.set(ev.slot.name, ev.slot);
    render();
  } else if (ev.type === "slot.deleted") {
    if (!applicable(ev, socket)) return;
    slots.delete(ev.slot);
    render();
  } else if (ev.type === "slot.inflight") {
    // {slot name: requests in flight}, for the slots whose count changed
    for (const [name, count] of Object.entries(ev.inflight)) {
      const slot = slots.get(name);
      if (slot) slot.inflight = count;
    }
    renderSlots();
  } else if (ev.type === "queue") {
    noteQueue(ev);
    renderSlots();
    pending?.show();
  } else if (ev.type === "dispatch.decision") {
    noteWhy(ev);
    logDecision(ev);
  }
}

function connect() {
  const url = new URL(app.dataset.ws, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  // "live" once the snapshot is in: it says whether updates follow (see onEvent).
  socket.addEventListener("open", () => {
    backoff = BACKOFF_MIN_MS;
  });
  socket.addEventListener("message", (e) => onMessage(JSON.parse(e.data), socket));
  socket.addEventListener("close", (e) => {
    if (e.code === LIVE_PAUSED) {
      setLive("paused", `${PAUSED}: reconnecting…`);
      setTimeout(connect, PAUSED_RETRY_MS * (0.5 + Math.random() / 2));
      return;
    }
    // The server sends a new snapshot on every connect, so nothing missed meanwhile is lost.
    const wait = backoff * (0.5 + Math.random() / 2);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setLive("down", `reconnecting in ${Math.ceil(wait / 1000)} s…`);
    setTimeout(connect, wait);
  });
}

// ---- chatting ------------------------------------------------------------------------------

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

function scrollDown() {
  messagesList.lastElementChild?.scrollIntoView({ block: "end" });
}

function addUserMessage(text) {
  messagesList.append(h("li", { className: "msg user" }, h("div", { className: "body" }, text)));
  scrollDown();
}

// One assistant answer in the conversation, rendered at most once per frame while it streams.
function addAnswer(model) {
  const body = h("div", { className: "body markdown" });
  const meta = h("p", { className: "meta" }, `asking ${model}…`);
  const item = h("li", { className: "msg assistant pending", dataset: { model } }, body, meta);
  messagesList.append(item);
  scrollDown();
  let text = "";
  let frame = 0;
  return {
    update(newText) {
      text = newText;
      if (!frame) {
        frame = requestAnimationFrame(() => {
          frame = 0;
          body.innerHTML = markdown(text);
          scrollDown();
        });
      }
    },
    meta(line) {
      meta.textContent = line;
    },
    finish(line) {
      item.classList.remove("pending");
      if (frame) cancelAnimationFrame(frame);
      frame = 0;
      body.innerHTML = markdown(text);
      meta.textContent = line;
    },
    why(text) {
      // The router's own words for where this answer came from (see dispatch/explain.py).
      let line = item.querySelector(".why");
      if (!line) {
        line = h("p", { className: "why" });
        meta.after(line);
      }
      line.textContent = text;
    },
    fail(message) {
      item.classList.remove("pending");
      item.classList.add("failed");
      item.append(h("p", { className: "error", role: "alert" }, message));
    },
  };
}

// A server-sent event stream's events: {data} per event, {comment} per comment line (hal0web
// says where a waiting request stands in one: ": hal0 queued position=2 reason=loading ...").
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const lines = block.split(/\r?\n/);
      for (const line of lines) {
        if (line.startsWith(":")) yield { comment: line.slice(1).trim() };
      }
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield { data };
    }
  }
}

async function describeError(response, model) {
  let error = {};
  try {
    error = (await response.json()).error ?? {};
  } catch {
    // not JSON (a proxy in between, say): the status line has to do
  }
  const message = error.message || response.statusText || "no details";
  const retry = response.headers.get("Retry-After");
  const later = retry ? ` Try again in ${retry} s.` : "";
  switch (response.status) {
    case 404:
      return `No slot serves ${model}. ${message}`;
    case 429:
      return `Too many requests right now. ${message}${later}`;
    case 503:
      return `${model} is not available right now (${error.code ?? "unavailable"}). ${message}${later}`;
    case 401:
    case 403:
      return `Not allowed (${response.status}). ${message} Reload the page to log in again.`;
    default:
      return `The request failed (${response.status}). ${message}`;
  }
}

function statsLine(slot, resolution, started, firstAt, endedAt, tokens, note) {
  const parts = [`answered by ${slot ?? "?"}`, resolution ?? "?"];
  parts.push(firstAt === null ? "no tokens" : `TTFT ${Math.round(firstAt - started)} ms`);
  const seconds = (endedAt - (firstAt ?? endedAt)) / 1000;
  parts.push(tokens > 1 && seconds > 0 ? `${((tokens - 1) / seconds).toFixed(1)} tok/s` : "– tok/s");
  if (note) parts.push(note);
  return parts.join(" · ");
}

// The page names its own request (X-Request-Id): the loader's queue lists each waiting
// request by its id, so the page finds its own place there. Not crypto.randomUUID: a page
// served over plain http on a LAN is no secure context, and has none.
function newRequestId() {
  return [...crypto.getRandomValues(new Uint8Array(16))]
    .map((b) => b.toString(16).padStart(2, "0"))
    .join("");
}

// Where the page's own request waits, while no token has come: "queued 2nd — loading gemma3,
// 40 %, 14 s". From the stream's own comments when they came (exact), else from the loader's
// queue of the chosen slot (its place there when listed by this request's id). Null: no wait.
function waitingLine(wait) {
  const secs = `${Math.round((performance.now() - wait.started) / 1000)} s`;
  const told = wait.told;
  if (told?.position) {
    const what = [told.reason, told.model].filter(Boolean).join(" ");
    const parts = [what, told.progress ? `${told.progress} %` : null, secs];
    return `queued ${ordinal(Number(told.position))} — ${parts.filter(Boolean).join(", ")}`;
  }
  const q = queues.get(wait.slot);
  if (!q) return null;
  const mine = q.queue.find((w) => w.ticket === wait.requestId);
  const where = mine
    ? `queued ${ordinal(mine.position)}`
    : q.queue.length
      ? `queued (${q.queue.length} waiting)`
      : "waiting";
  const doing = q.loading
    ? [`loading ${q.loading}`, q.progress === null || q.progress === undefined ? null : percent(q.progress)]
    : loaderDoing(q);
  return `${where} — ${[...doing, secs].filter(Boolean).join(", ")}`;
}

function waitFor(answer, model, requestId, started) {
  return {
    slot: model.split("/")[0], // the picker's values are slot/model
    requestId,
    started,
    told: null, // the last "hal0 queued" comment of the stream, as key=value pairs
    base: `asking ${model}…`,
    show() {
      answer.meta(waitingLine(this) ?? this.base);
    },
  };
}

// ": hal0 queued position=2 reason=loading model=gemma3 progress=40" -> its pairs.
function queuedComment(comment) {
  const found = comment.match(/^hal0 queued\b(.*)$/);
  if (!found) return null;
  return Object.fromEntries(
    found[1].trim().split(/\s+/).filter(Boolean).map((pair) => {
      const at = pair.indexOf("=");
      return at < 0 ? [pair, ""] : [pair.slice(0, at), pair.slice(at + 1)];
    }),
  );
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
}

async function send() {
  const text = promptBox.value.trim();
  const model = picker.value;
  if (!text || running) return;
  if (!model) {
    addAnswer("nothing").fail("Choose a model first: no slot offers one yet.");
    return;
  }
  conversation.push({ role: "user", content: text });
  addUserMessage(text);
  promptBox.value = "";
  const answer = addAnswer(model);
  const controller = new AbortController();
  running = controller;
  setBusy(true);
  const started = performance.now();
  let firstAt = null;
  let tokens = 0;
  let content = "";
  let slot = null;
  let resolution = null;
  const sentId = newRequestId();
  let requestId = null;
  let failure = null;
  let streamed = false;
  const wait = waitFor(answer, model, sentId, started);
  pending = wait;
  wait.show();
  try {
    const response = await fetch(app.dataset.api, {
      method: "POST",
      credentials: "same-origin",
      signal: controller.signal,
      headers: {
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        "X-CSRFToken": csrfToken(),
        "X-Request-Id": sentId,
      },
      body: JSON.stringify({ model, stream: true, messages: conversation }),
    });
    slot = response.headers.get("X-Hal0-Slot");
    resolution = response.headers.get("X-Hal0-Resolution");
    requestId = response.headers.get("X-Request-Id");
    if (!response.ok) {
      failure = await describeError(response, model);
    } else {
      streamed = true;
      wait.base = `streaming from ${slot ?? "?"}…`;
      wait.show();
      for await (const event of sseEvents(response.body)) {
        if (event.comment !== undefined) {
          const told = queuedComment(event.comment);
          if (told && pending === wait) {
            wait.told = told;
            wait.show();
          }
          continue;
        }
        const data = event.data;
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = `The stream broke off: ${chunk.error.message ?? chunk.error.code ?? "upstream error"}`;
          break;
        }
        if (chunk.usage?.completion_tokens) tokens = chunk.usage.completion_tokens;
        const piece = chunk.choices?.[0]?.delta?.content ?? "";
        if (piece) {
          if (pending === wait) {
            pending = null; // it waits no more: its queue line gives way to the answer
            answer.meta(wait.base);
          }
          firstAt ??= performance.now();
          if (!chunk.usage) tokens += 1; // llama.cpp and friends send one token per chunk
          content += piece;
          answer.update(content);
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") failure = `The request failed: ${err.message}`;
  } finally {
    running = null;
    if (pending === wait) pending = null;
    setBusy(false);
  }
  const stopped = controller.signal.aborted;
  if (content) {
    conversation.push({ role: "assistant", content });
  } else if (failure || stopped) {
    // Nothing came back: take the question out of the conversation and give it back for a retry.
    conversation.pop();
    if (!promptBox.value) promptBox.value = text;
  }
  const note = stopped ? "stopped" : "";
  if (streamed) {
    answer.finish(statsLine(slot, resolution, started, firstAt, performance.now(), tokens, note));
  } else {
    // Refused before any answer: say where the router sent it, if anywhere.
    answer.finish([slot ? `routed to ${slot} · ${resolution}` : "", note].filter(Boolean).join(" · "));
  }
  if (failure) answer.fail(failure);
  showWhy(requestId, answer);
}

composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
promptBox.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    composer.requestSubmit();
  }
});
stopButton.addEventListener("click", () => running?.abort());
$("reset").addEventListener("click", () => {
  running?.abort();
  conversation.length = 0;
  messagesList.replaceChildren();
  promptBox.focus();
});

setBusy(false);
connect();
