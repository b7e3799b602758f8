// lamina's chat page: plain JavaScript, no build step, no other host. Talks to this server's
// OpenAI-compatible routes with relative URLs (so a proxy's path prefix works) and keeps conversations
// in localStorage. Model output is escaped before any markup is added (renderMarkdown).
"use strict";

const BASE = new URL(".", location.href);
const STORE = "lamina.conversations";
const CONTROLS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed"];
const $ = (id) => document.getElementById(id);

// ---- Markdown: escape everything, then add a few safe constructs ----------------------------------

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// inline: `code`, **bold**, *italic* / _italic_, [text](http(s) url), and with `cite` ({numbers, prefix}:
// the numbers of a grounded reply's sources) citation markers [1] / [1, 2] as links to #prefix-N; input is
// already escaped
function inline(escaped, cite) {
  const held = [];
  const hold = (html) => "\u0000" + (held.push(html) - 1) + "\u0000";
  let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => hold("<code>" + code + "</code>"));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
    hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer nofollow">' + label + "</a>"));
  if (cite) {
    // a marker run not right after a word character, ] or ) (sys.argv[0], f(x)[1] are code), as cite() reads it
    s = s.replace(/(?<![\w\])])(?:\[\d+(?:\s*,\s*\d+)*\])+/g, (run) => run.replace(/\[(\d+(?:\s*,\s*\d+)*)\]/g, (whole, list) => {
      const nums = list.split(",").map((x) => Number(x.trim()));
      if (!nums.some((n) => cite.numbers.includes(n))) return whole; // a number no source has stays text
      return hold("[" + nums.map((n) => (cite.numbers.includes(n)
        ? '<a class="cite" href="#' + cite.prefix + "-" + n + '">' + n + "</a>" : String(n))).join(", ") + "]");
    }));
  }
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^\w*])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
  for (let k = 0; k < 3 && s.includes("\u0000"); k += 1) s = s.replace(/\u0000(\d+)\u0000/g, (_, i) => held[Number(i)]);
  return s; // (a held link may hold held code: restored in a second pass)
}

function blocks(text, cite) {
  const inline_ = (line) => inline(line, cite);
  const out = [];
  let list = null; // "ul" or "ol" while inside a list
  let para = [];
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(inline_).join("<br>") + "</p>");
    para = [];
  };
  const closeList = () => {
    if (list) out.push("</" + list + ">");
    list = null;
  };
  for (const line of escapeHtml(text).split("\n")) {
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const number = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (bullet || number) {
      flushPara();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) {
        closeList();
        out.push("<" + kind + ">");
        list = kind;
      }
      out.push("<li>" + inline_((bullet || number)[1]) + "</li>");
    } else if (heading) {
      flushPara();
      closeList();
      const level = Math.min(heading[1].length + 2, 6); // small headings inside a message
      out.push("<h" + level + ">" + inline_(heading[2]) + "</h" + level + ">");
    } else if (!line.trim()) {
      flushPara();
      closeList();
    } else {
      closeList();
      para.push(line);
    }
  }
  flushPara();
  closeList();
  return out.join("");
}

// Markdown -> HTML that holds only tags made here: all of `text` is escaped first. Fenced code blocks
// (an unterminated fence, while streaming, runs to the end), inline code, bold, italic, lists, headings,
// and links whose address starts with http:// or https://; with `cite`, citation markers (see inline).
function renderMarkdown(text, cite) {
  const parts = String(text).replace(/\u0000/g, "").split(/^```/m);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      html += blocks(part, cite);
      return;
    }
    const nl = part.indexOf("\n");
    const lang = nl < 0 ? "" : part.slice(0, nl).trim().replace(/[^\w+-]/g, "").slice(0, 20);
    const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
    const cls = lang ? ' class="language-' + lang + '"' : "";
    html += "<pre><code" + cls + ">" + escapeHtml(code) + "</code></pre>";
  });
  return html;
}

// ---- State -------------------------------------------------------------------------------------

const state = {
  config: null, // GET /lamina/config
  models: [], // GET /v1/models
  conversations: [],
  current: null,
  running: [], // AbortControllers of the streams in flight
  lastRequests: [], // the bodies of the last requests sent (for the tests and the curious)
};

function loadConversations() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    state.conversations = Array.isArray(saved) ? saved : [];
  } catch (e) {
    state.conversations = [];
  }
  const last = localStorage.getItem(STORE + ".current");
  state.current = state.conversations.find((c) => c.id === last) || state.conversations[0] || null;
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
    if (state.current) localStorage.setItem(STORE + ".current", state.current.id);
  } catch (e) {
    showError("Could not save the conversation in this browser's storage: " + e.message);
  }
}

function newConversation() {
  const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
    created: new Date().toISOString(), system: $("system").value, messages: [] };
  state.conversations.unshift(conv);
  state.current = conv;
  return conv;
}

function exportJSON() {
  return JSON.stringify({ exported: new Date().toISOString(), conversations: state.conversations }, null, 2);
}

// ---- HTTP --------------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem("lamina.apiKey") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function failure(resp) {
  let message = resp.statusText || "error";
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  return new HttpError(resp.status, message, resp.headers.get("Retry-After"));
}

async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(new URL(path, BASE), { headers: headers() });
  } catch (e) {
    throw new HttpError(0, e.message);
  }
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// A readable sentence for an error of a request; 401 also opens the key form.
function describe(err) {
  if (err.status === 0) return "Cannot reach the server at " + BASE.href + " (is lamina serve running?). Your conversation is kept; send again when it is back.";
  if (err.status === 401) {
    askKey();
    return "The server needs a valid API key (401: " + err.message + "). Enter it, then send again.";
  }
  if (err.status === 429) return "The server is busy (429: " + err.message + ")." + (err.retryAfter ? " Retry in " + err.retryAfter + " s." : " Retry in a moment.");
  if (err.status >= 500) return "The server failed (" + err.status + ": " + err.message + "). Your conversation is kept; try again.";
  return "The request was refused (" + err.status + ": " + err.message + ").";
}

// ---- Controls ----------------------------------------------------------------------------------

function modelDefaults(id) {
  const m = state.config && state.config.models.find((x) => x.id === id);
  return (m && m.defaults) || {};
}

function applyDefaults() {
  const d = modelDefaults($("model").value);
  for (const name of CONTROLS) $(name).value = d[name] === null || d[name] === undefined ? "" : d[name];
  $("stop").value = (d.stop || []).join("\n");
}

function parseExtra(id) {
  const text = $(id).value.trim();
  if (!text) return {};
  const value = JSON.parse(text); // a SyntaxError is shown to the user by send()
  if (!value || typeof value !== "object" || Array.isArray(value)) throw new SyntaxError(id + " must be a JSON object");
  return value;
}

// The request body of one pane: the controls, then the extra JSON fields (B's on top of them).
function requestBody(model, messages, pane) {
  const body = { model: model, messages: messages, stream: true, stream_options: { include_usage: true } };
  for (const name of CONTROLS) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  if ($("rag").checked && state.config && state.config.index) { // grounded on the server's index
    const rag = {};
    if ($("rag_top_k").value.trim() !== "") rag.top_k = Number($("rag_top_k").value);
    if ($("rag_mode").value) rag.mode = $("rag_mode").value;
    body.rag = Object.keys(rag).length ? rag : true;
  }
  Object.assign(body, parseExtra("extra"));
  if (pane === 1) Object.assign(body, parseExtra("extra-b"));
  return body;
}

// ---- Rendering ---------------------------------------------------------------------------------

function paneCount() {
  return $("compare").checked ? 2 : 1;
}

function replyOf(msg, pane) {
  return pane === 1 ? msg.b || { content: "" } : msg;
}

function formatStats(s) {
  if (!s) return "";
  const parts = [];
  if (s.model) parts.push(s.model);
  if (s.prompt_tokens !== undefined) parts.push("prompt " + s.prompt_tokens + " tok");
  if (s.completion_tokens !== undefined) parts.push("completion " + s.completion_tokens + " tok");
  if (s.ttft_ms !== undefined) parts.push("first token " + Math.round(s.ttft_ms) + " ms");
  if (s.tokens_per_s !== undefined) parts.push(s.tokens_per_s.toFixed(1) + " tok/s");
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}

// A grounded reply's citation links: its sources' numbers and the id prefix of its source list.
function citeOf(reply, prefix) {
  return reply.sources && reply.sources.length ? { numbers: reply.sources.map((s) => Number(s.number)), prefix: prefix } : null;
}

// The sources of a grounded reply: one line each (number, document, span, page, score) that opens on
// its passage; all text through textContent.
function sourcesNode(reply, prefix) {
  const list = document.createElement("ol");
  list.className = "sources";
  const cited = new Set(reply.citations || []);
  for (const s of reply.sources) {
    const n = Number(s.number);
    const li = document.createElement("li");
    li.id = prefix + "-" + n;
    if (cited.has(n)) li.classList.add("cited");
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const span = Array.isArray(s.span) ? ", chars " + s.span[0] + "-" + s.span[1] : "";
    const page = s.page === null || s.page === undefined ? "" : ", page " + s.page;
    summary.textContent = "[" + n + "] " + s.document + span + page + " (score " + Number(s.score).toFixed(3) + ")";
    const passage = document.createElement("div");
    passage.className = "passage";
    passage.textContent = s.text;
    details.appendChild(summary);
    details.appendChild(passage);
    li.appendChild(details);
    list.appendChild(li);
  }
  return list;
}

function sourcePrefix(pane, index) {
  return "source-" + pane + "-" + index;
}

// A click on a citation opens its source's passage (and scrolls to it) instead of following the link.
function openCitation(e) {
  const a = e.target && e.target.closest ? e.target.closest("a.cite") : null;
  if (!a) return;
  e.preventDefault();
  const item = document.getElementById(a.getAttribute("href").slice(1));
  if (!item) return;
  item.querySelector("details").open = true;
  item.scrollIntoView({ block: "nearest" });
  item.classList.add("flash");
  setTimeout(() => item.classList.remove("flash"), 1500);
}

function messageNode(msg, pane, index, last) {
  const node = document.createElement("div");
  node.className = "msg " + msg.role;
  const body = document.createElement("div");
  body.className = "body";
  if (msg.role === "user") {
    body.textContent = msg.content; // the user's text as typed
  } else {
    const reply = replyOf(msg, pane);
    body.innerHTML = renderMarkdown(reply.content || "", citeOf(reply, sourcePrefix(pane, index)));
    if (reply.error) {
      const e = document.createElement("p");
      e.className = "msg-error";
      e.textContent = reply.error;
      body.appendChild(e);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = formatStats(reply.stats);
    node.appendChild(body);
    if (reply.sources && reply.sources.length) node.appendChild(sourcesNode(reply, sourcePrefix(pane, index)));
    node.appendChild(meta);
  }
  if (msg.role === "user") node.appendChild(body);
  if (last && pane === 0 && !state.running.length) {
    const tools = document.createElement("div");
    tools.className = "tools";
    const button = (label, action) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.className = action;
      b.addEventListener("click", action === "regenerate" ? regenerate : editLast);
      tools.appendChild(b);
    };
    if (msg.role === "assistant") button("Regenerate", "regenerate");
    if (msg.role === "user" || msg.role === "assistant") button("Edit last message", "edit");
    node.appendChild(tools);
  }
  node.dataset.index = index;
  return node;
}

function render() {
  document.body.classList.toggle("comparing", paneCount() === 2);
  const conv = state.current;
  const msgs = conv ? conv.messages : [];
  ["pane-a", "pane-b"].forEach((id, pane) => {
    const box = $(id).querySelector(".messages");
    box.textContent = "";
    msgs.forEach((m, i) => box.appendChild(messageNode(m, pane, i, i === msgs.length - 1)));
    const lastReply = [...msgs].reverse().find((m) => m.role === "assistant");
    $(id).querySelector(".stats").textContent = lastReply ? formatStats(replyOf(lastReply, pane).stats) : "";
    box.scrollTop = box.scrollHeight;
  });
  const history = $("history");
  history.textContent = "";
  for (const c of state.conversations) {
    const o = document.createElement("option");
    o.value = c.id;
    o.textContent = c.title;
    history.appendChild(o);
  }
  if (conv) history.value = conv.id;
  $("stop-btn").disabled = !state.running.length;
  $("send").disabled = !!state.running.length;
}

// Re-render only the streaming reply of one pane (cheap enough per token for chat-sized replies).
function renderReply(pane, msg) {
  const box = $(pane === 0 ? "pane-a" : "pane-b").querySelector(".messages");
  const node = box.lastElementChild;
  if (!node) return;
  const reply = replyOf(msg, pane);
  const prefix = sourcePrefix(pane, node.dataset.index);
  node.querySelector(".body").innerHTML = renderMarkdown(reply.content, citeOf(reply, prefix));
  if (reply.sources && reply.sources.length && !node.querySelector(".sources")) {
    node.insertBefore(sourcesNode(reply, prefix), node.querySelector(".meta"));
  }
  node.querySelector(".meta").textContent = formatStats(reply.stats);
  $(pane === 0 ? "pane-a" : "pane-b").querySelector(".stats").textContent = formatStats(reply.stats);
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// ---- Streaming ---------------------------------------------------------------------------------

// History for one pane: the system prompt, every message, and that pane's replies.
function history(conv, pane, upTo) {
  const out = [];
  if (conv.system) out.push({ role: "system", content: conv.system });
  for (const m of conv.messages.slice(0, upTo)) {
    if (m.role === "user") out.push({ role: "user", content: m.content });
    else if (!replyOf(m, pane).error || replyOf(m, pane).content) out.push({ role: "assistant", content: replyOf(m, pane).content });
  }
  return out;
}

async function stream(pane, model, body, msg) {
  const reply = pane === 1 ? msg.b : msg;
  const controller = new AbortController();
  state.running.push(controller);
  const t0 = performance.now();
  let tFirst = null;
  let counted = 0;
  reply.stats = { model: model };
  try {
    let resp;
    try {
      resp = await fetch(new URL("v1/chat/completions", BASE), {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new HttpError(0, e.message);
    }
    if (!resp.ok) throw await failure(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            done = true;
            continue;
          }
          const obj = JSON.parse(data);
          if (obj.error) throw new HttpError(obj.error.code === "timeout" ? 504 : 500, obj.error.message);
          if (obj.sources) reply.sources = obj.sources; // grounded: the passages the prompt showed
          const choice = obj.choices && obj.choices[0];
          if (choice && choice.citations) reply.citations = choice.citations; // the numbers the reply cites
          const delta = choice && choice.delta;
          if (delta && delta.content) {
            if (tFirst === null) {
              tFirst = performance.now();
              reply.stats.ttft_ms = tFirst - t0;
            }
            counted += 1;
            reply.content += delta.content;
            reply.stats.completion_tokens = counted;
          }
          if (obj.usage) {
            reply.stats.prompt_tokens = obj.usage.prompt_tokens;
            reply.stats.completion_tokens = obj.usage.completion_tokens;
          }
          if (tFirst !== null) {
            const secs = (performance.now() - tFirst) / 1000;
            if (secs > 0 && reply.stats.completion_tokens > 1) reply.stats.tokens_per_s = (reply.stats.completion_tokens - 1) / secs;
          }
        }
      }
      renderReply(pane, msg);
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stats.stopped = true;
    else if (e instanceof HttpError) {
      reply.error = describe(e);
      showError(reply.error);
    } else {
      reply.error = "The reply could not be read: " + e.message;
      showError(reply.error);
    }
  } finally {
    state.running = state.running.filter((c) => c !== controller);
  }
}

// Send the conversation's history (up to its last user message) to each pane's model.
async function runTurn(conv) {
  clearError();
  const models = [$("model").value, $("model-b").value].slice(0, paneCount());
  const msg = { role: "assistant", content: "", model: models[0] };
  if (models.length === 2) msg.b = { content: "", model: models[1] };
  let bodies;
  try {
    bodies = models.map((m, pane) => requestBody(m, history(conv, pane, conv.messages.length), pane));
  } catch (e) {
    showError("The extra request fields are not valid JSON: " + e.message);
    return;
  }
  conv.messages.push(msg);
  state.lastRequests = bodies;
  save();
  const runs = bodies.map((body, pane) => stream(pane, models[pane], body, msg));
  render();
  await Promise.all(runs);
  save();
  render();
}

function send() {
  if (state.running.length) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  if (!$("model").value) {
    showError("No model to talk to yet: the server's model list did not load.");
    return;
  }
  const conv = state.current || newConversation();
  conv.system = $("system").value;
  if (!conv.messages.length) conv.title = text.trim().slice(0, 40);
  conv.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  runTurn(conv);
}

function stop() {
  for (const c of state.running) c.abort(); // the server cancels generation when the stream closes
}

function regenerate() {
  const conv = state.current;
  if (!conv || state.running.length) return;
  if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  if (conv.messages.length) runTurn(conv);
}

function editLast() {
  const conv = state.current;
  if (!conv || state.running.length) return;
  let i = conv.messages.length - 1;
  while (i >= 0 && conv.messages[i].role !== "user") i -= 1;
  if (i < 0) return;
  $("prompt").value = conv.messages[i].content;
  conv.messages.splice(i);
  save();
  render();
  $("prompt").focus();
}

// ---- Embeddings: a similarity matrix of a few texts ---------------------------------------------

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

async function compareTexts() {
  const texts = $("embed-texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  const out = $("embed-result");
  out.textContent = "";
  if (!texts.length) return;
  clearError();
  let resp;
  try {
    try {
      resp = await fetch(new URL("v1/embeddings", BASE), { method: "POST", headers: headers(),
        body: JSON.stringify({ model: $("embed-model").value, input: texts, truncate: true }) });
    } catch (e) {
      throw new HttpError(0, e.message);
    }
    if (!resp.ok) throw await failure(resp);
  } catch (e) {
    showError(describe(e));
    return;
  }
  const vectors = (await resp.json()).data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
  const table = document.createElement("table");
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  for (const t of texts) {
    const th = document.createElement("th");
    th.textContent = t;
    th.title = t;
    head.appendChild(th);
  }
  texts.forEach((t, i) => {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.textContent = t;
    th.title = t;
    row.appendChild(th);
    vectors.forEach((v, j) => {
      const sim = cosine(vectors[i], v);
      const cell = row.insertCell();
      cell.textContent = sim.toFixed(3);
      // CSSOM, which the CSP allows (a style attribute in markup it would not)
      cell.style.backgroundColor = "rgba(43, 95, 217, " + (Math.max(0, sim) * 0.6).toFixed(3) + ")";
    });
  });
  out.appendChild(table);
}

// ---- Start -------------------------------------------------------------------------------------

function askKey() {
  $("key-dialog").hidden = false;
  $("api-key").focus();
}

async function loadModels() {
  try {
    if (!state.config) state.config = await getJSON("lamina/config");
    if (state.config.auth && !apiKey()) {
      askKey();
      return;
    }
    const list = await getJSON("v1/models");
    state.models = list.data.filter((m) => m.kind !== "embedding");
    const encoders = list.data.filter((m) => m.kind === "embedding");
    document.body.classList.toggle("has-embeddings", encoders.length > 0);
    document.body.classList.toggle("has-index", !!state.config.index);
    $("embed-model").textContent = "";
    for (const m of encoders) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      $("embed-model").appendChild(o);
    }
    for (const id of ["model", "model-b"]) {
      const select = $(id);
      const before = select.value;
      select.textContent = "";
      for (const m of state.models) {
        const o = document.createElement("option");
        o.value = m.id;
        o.textContent = m.parent ? m.id + " (on " + m.parent + ")" : m.id;
        select.appendChild(o);
      }
      if (before && state.models.some((m) => m.id === before)) select.value = before;
    }
    if (state.models.length > 1 && !$("model-b").dataset.touched) $("model-b").selectedIndex = 1;
    applyDefaults();
    const index = state.config.index;
    $("about").textContent = "lamina " + state.config.version + " · " + state.models.length + " model(s)"
      + (index ? " · index of " + index.chunks + " passages (" + index.embedding_model + ")" : "");
    clearError();
  } catch (e) {
    showError(describe(e));
  }
}

function init() {
  loadConversations();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stop();
  });
  $("stop-btn").addEventListener("click", stop);
  $("panes").addEventListener("click", openCitation);
  $("model").addEventListener("change", applyDefaults);
  $("model-b").addEventListener("change", () => { $("model-b").dataset.touched = "1"; });
  $("compare").addEventListener("change", render);
  $("defaults").addEventListener("click", applyDefaults);
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("new-chat").addEventListener("click", () => {
    if (state.running.length) return;
    newConversation();
    save();
    render();
  });
  $("delete-chat").addEventListener("click", () => {
    if (state.running.length || !state.current) return;
    state.conversations = state.conversations.filter((c) => c !== state.current);
    state.current = state.conversations[0] || null;
    save();
    render();
  });
  $("history").addEventListener("change", () => {
    if (state.running.length) return;
    state.current = state.conversations.find((c) => c.id === $("history").value) || state.current;
    $("system").value = state.current ? state.current.system || "" : "";
    save();
    render();
  });
  $("export").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([exportJSON()], { type: "application/json" }));
    const a = document.createElement("a");
    a.href = url;
    a.download = "lamina-conversations.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
  $("error-close").addEventListener("click", clearError);
  $("toggle-embed").addEventListener("click", () => {
    const on = $("embed-view").hidden;
    $("embed-view").hidden = !on;
    document.body.classList.toggle("embedding", on);
    $("toggle-embed").setAttribute("aria-pressed", String(on));
  });
  $("embed-run").addEventListener("click", compareTexts);
  $("key-dialog").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem("lamina.apiKey", key);
    $("api-key").value = "";
    $("key-dialog").hidden = true;
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem("lamina.apiKey");
    if (state.config && state.config.auth) askKey();
  });
  if (state.current) $("system").value = state.current.system || "";
  render();
  loadModels();
  $("prompt").focus();
}

// for tests and the console: the renderer, the state, what was sent
window.lamina = { renderMarkdown, escapeHtml, state, exportJSON, send, stop, cosine };
document.addEventListener("DOMContentLoaded", init);
