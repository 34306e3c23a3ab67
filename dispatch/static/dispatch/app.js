// hal0web chat page: a slot picker kept live over the WebSocket, streaming chat through
// /v1/chat/completions, and a side panel of slot cards and recent routing decisions.

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

const STORE_KEY = "hal0.model";
const LOG_SIZE = 50;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;

const slots = new Map(); // slot name -> the server's latest payload for it
let tableVersion = 0;
// Whether the watcher keeps slot state fresh; when not, no badge may claim a state.
let watcher = { stale: false, probed_at: null };
// The server's states (dispatch/routing/states.py), from the snapshot that comes before any
// slot: the badge a stale watcher leaves, why a slot in each unusable state cannot take a
// request, and the tone (ok, warn, bad) each is shown in.
let states = null;
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
  // The page talks to /v1/chat/completions: a slot that does not offer it cannot answer here.
  if (!(slot.endpoints ?? []).includes("chat/completions")) {
    return `${slot.name} (${slot.type}) does not offer chat/completions`;
  }
  return null;
}

// ---- the model picker ----------------------------------------------------------------------

let pickerShows = ""; // what the picker was last built from: unchanged input, no rebuild

function renderPicker() {
  // Rebuilding closes a dropdown the user has open, so only do it when something shown changed.
  const shows = JSON.stringify(
    sortedSlots().map((s) => [s.name, s.state, s.type, s.endpoints, s.last_error, s.models]),
  );
  if (shows === pickerShows) return;
  pickerShows = shows;
  const wanted = localStorage.getItem(STORE_KEY) || picker.value;
  const groups = sortedSlots().map((slot) => {
    const reason = unusable(slot);
    const group = h("optgroup", {
      label: `${slot.name} · ${slot.state}`,
      dataset: { slot: slot.name, state: slot.state },
    });
    for (const model of slot.models) {
      const label = model.source === "alias" ? `${model.id} → ${model.upstream}` : model.id;
      const option = new Option(model.default ? `${label} (default)` : label, `${slot.name}/${model.id}`);
      option.disabled = reason !== null;
      option.title = reason ?? `${slot.name} · ${model.source}`;
      group.append(option);
    }
    return group;
  });
  picker.replaceChildren(...groups);
  // Keep the user's choice even while its slot is unusable (it comes back when the slot
  // does); only a choice that no longer exists falls back to the first usable model.
  const options = [...picker.options];
  const keep = options.find((o) => o.value === wanted);
  const fallback = options.find((o) => !o.disabled);
  picker.value = (keep ?? fallback ?? { value: "" }).value;
}

picker.addEventListener("change", () => localStorage.setItem(STORE_KEY, picker.value));

// ---- the side panel ------------------------------------------------------------------------

function slotCard(slot) {
  const limit = slot.max_concurrency ? ` / ${slot.max_concurrency}` : "";
  const state = watcher.stale ? states.unknown : slot.state;
  const models = slot.models.map((m) =>
    h("li", {}, h("code", {}, m.id), m.default ? " default" : "", m.source === "alias" ? ` → ${m.upstream}` : "",
      m.source === "discovered" ? " (discovered)" : ""),
  );
  return h(
    "article",
    { className: `slot state-${state} tone-${states.tones[state] ?? "none"}`, dataset: { slot: slot.name, state } },
    h("header", {}, h("h3", {}, slot.name), h("span", { className: "badge" }, state)),
    h("p", { className: "meta" }, `${slot.kind} · ${slot.type} · in flight ${slot.inflight}${limit}`),
    h("ul", { className: "models" }, ...models),
    h(
      "p",
      { className: "endpoints", title: slot.endpoints_listed ? "listed in its manifest" : `the defaults of type ${slot.type}` },
      `serves ${(slot.endpoints ?? []).join(", ") || "nothing"}`,
    ),
    slot.drift.length
      ? h("p", { className: "warn" }, `Declared but not served by the upstream: ${slot.drift.join(", ")}`)
      : null,
    slot.last_error ? h("p", { className: "error" }, slot.last_error) : null,
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

function onEvent(ev, socket) {
  if (ev.type === "snapshot") {
    slots.clear();
    for (const slot of ev.slots) slots.set(slot.name, slot);
    tableVersion = ev.version;
    watcher = ev.watcher ?? watcher;
    states = ev.states ?? states;
    pickerShows = ""; // the states' words may have changed with the server: rebuild
    render();
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
  } else if (ev.type === "dispatch.decision") {
    noteWhy(ev);
    logDecision(ev);
  }
}

function connect() {
  const url = new URL(app.dataset.ws, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  socket.addEventListener("open", () => {
    backoff = BACKOFF_MIN_MS;
    setLive("live", "live");
  });
  socket.addEventListener("message", (e) => onEvent(JSON.parse(e.data), socket));
  socket.addEventListener("close", () => {
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

// The data payloads of a server-sent event stream, one string per event.
async function* sseData(stream) {
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
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
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
  let requestId = null;
  let failure = null;
  let streamed = false;
  try {
    const response = await fetch(app.dataset.api, {
      method: "POST",
      credentials: "same-origin",
      signal: controller.signal,
      headers: {
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        "X-CSRFToken": csrfToken(),
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
      answer.meta(`streaming from ${slot ?? "?"}…`);
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = `The stream broke off: ${chunk.error.message ?? chunk.error.code ?? "upstream error"}`;
          break;
        }
        if (chunk.usage?.completion_tokens) tokens = chunk.usage.completion_tokens;
        const piece = chunk.choices?.[0]?.delta?.content ?? "";
        if (piece) {
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
