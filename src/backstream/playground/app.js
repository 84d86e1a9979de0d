// Backstream playground: synchronous chat, background runs, several watchers per run, and
// resume across a page reload. No build step, no external assets. The API key stays in
// sessionStorage (this tab only); each watcher keeps its run id, the last event id it showed
// and its text there too, and reconnects with ?after=<last id> so nothing repeats.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY = "backstream.playground";

function loadState() {
  try { return JSON.parse(sessionStorage.getItem(KEY)) || {}; } catch { return {}; }
}
function saveState(patch) {
  sessionStorage.setItem(KEY, JSON.stringify({ ...loadState(), ...patch }));
}

function headers(json) {
  const h = {};
  const key = $("#api-key").value.trim();
  const tenant = $("#tenant").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (tenant) h["X-Tenant"] = tenant;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = err.message + (err.requestId ? "  (request " + err.requestId + ")" : "");
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super((e.message || "HTTP " + status) + (e.type ? " [" + e.type + "]" : ""));
    this.status = status;
    this.requestId = body && body.request_id;
  }
}

async function api(method, path, body) {
  const resp = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

function requestBody() {
  const body = { messages: [{ role: "user", content: $("#prompt").value }], max_tokens: Number($("#max-tokens").value) || 256 };
  const model = $("#model").value;
  const system = $("#system").value.trim();
  if (model) body.model = model;
  if (system) body.system = system;
  return body;
}

// Server-sent events over fetch (EventSource cannot send Authorization): calls onEvent(seq, type, data)
// per complete frame; resolves when the body ends. Keepalive comments are skipped.
async function readSSE(resp, onEvent, signal) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (signal && signal.aborted) { reader.cancel(); return; }
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let id = null, type = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "id") id = Number(val);
        else if (field === "event") type = val;
        else if (field === "data") data += val;
      }
      if (id !== null && data) onEvent(id, type, JSON.parse(data));
    }
  }
}

function usageText(u) {
  return u ? (u.prompt_tokens ?? 0) + " in / " + (u.completion_tokens ?? 0) + " out" : "";
}

// ---------------------------------------------------------------- synchronous chat

async function chat() {
  showError(null);
  const out = $("#chat-out"), status = $("#chat-status");
  $("#chat-panel").hidden = false;
  out.textContent = "";
  status.className = "status live";
  status.textContent = "streaming…";
  $("#chat-btn").disabled = true;
  try {
    const resp = await fetch("/v1/messages", { method: "POST", headers: headers(true), body: JSON.stringify({ ...requestBody(), stream: true }) });
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    await readSSE(resp, (seq, type, data) => {
      if (type === "text_delta") out.textContent += data.delta;
      if (type === "stream_end") {
        status.className = "status";
        status.textContent = data.finish_reason + " · " + usageText(data.usage) + (data.error ? " · " + data.error.message : "");
      }
    });
  } catch (err) {
    status.className = "status bad";
    status.textContent = "failed";
    showError(err);
  } finally {
    $("#chat-btn").disabled = false;
  }
}

// ---------------------------------------------------------------- watchers

const watchers = new Map(); // wid -> Watcher

function persistWatchers() {
  saveState({ watchers: [...watchers.values()].map((w) => w.record()) });
}

class Watcher {
  constructor(run, saved) {
    this.wid = (saved && saved.wid) || run + ":" + Math.random().toString(36).slice(2, 8);
    this.run = run;
    this.seq = (saved && saved.seq) || 0;
    this.text = (saved && saved.text) || "";
    this.state = (saved && saved.state) || "connecting";
    this.done = Boolean(saved && saved.done);
    this.reconnects = 0;
    this.resumedFrom = saved && !this.done && this.seq ? this.seq : 0; // restored after a reload
    this.abort = new AbortController();
    this.el = $("#watcher-tpl").content.firstElementChild.cloneNode(true);
    this.el.dataset.run = run;
    this.el.dataset.wid = this.wid;
    $(".run-id", this.el).textContent = run;
    $(".run-id", this.el).title = run;
    $(".text", this.el).textContent = this.text;
    $(".more", this.el).onclick = () => openWatcher(run);
    $(".close", this.el).onclick = () => this.close();
    $(".cancel", this.el).onclick = () => api("POST", `/v1/messages/async/${run}/cancel`).catch(showError);
    $(".delete", this.el).onclick = () => api("DELETE", `/v1/messages/async/${run}`).catch(showError);
    $("#watchers").appendChild(this.el);
    this.render();
  }

  record() {
    return { wid: this.wid, run: this.run, seq: this.seq, text: this.text, state: this.state, done: this.done };
  }

  render(live) {
    const status = $(".status", this.el);
    status.className = "status" + (live ? " live" : "") + (this.state.startsWith("reconnecting") ? " retry" : "") + (this.state === "gone" ? " bad" : "");
    status.textContent = "seq " + this.seq + " · " + this.state +
      (this.resumedFrom ? " · resumed after seq " + this.resumedFrom : "") +
      (this.reconnects ? " · " + this.reconnects + " reconnect(s)" : "");
    status.dataset.seq = String(this.seq);
    status.dataset.done = String(this.done);
  }

  onEvent(seq, type, data) {
    if (seq <= this.seq) return; // already shown: never twice
    this.seq = seq;
    if (type === "text_delta") {
      this.text += data.delta;
      const pre = $(".text", this.el);
      pre.textContent = this.text;
      pre.scrollTop = pre.scrollHeight;
      this.state = "streaming";
    } else if (type === "stream_start") {
      this.state = "started on " + data.model;
    } else if (type === "stream_end") {
      this.done = true;
      this.state = data.finish_reason + " · " + usageText(data.usage) + (data.error ? " · " + data.error.message : "");
    }
    persistWatchers(); // text and seq saved together: a reload resumes exactly here
    this.render(!this.done);
  }

  async follow() {
    let delay = 500;
    while (!this.done && !this.abort.signal.aborted) {
      try {
        const resp = await fetch(`/v1/messages/async/${this.run}/stream?after=${this.seq}`, { headers: headers(false), signal: this.abort.signal });
        if (resp.status === 404) { this.state = "gone"; this.done = true; break; }
        if (!resp.ok && resp.status !== 503 && resp.status !== 429) throw new ApiError(resp.status, await resp.json().catch(() => null));
        if (resp.ok) {
          this.render(true);
          const before = this.seq;
          await readSSE(resp, (seq, type, data) => this.onEvent(seq, type, data), this.abort.signal);
          if (this.seq > before) delay = 500;
        }
      } catch (err) {
        if (this.abort.signal.aborted) return;
        if (err instanceof ApiError) { this.state = "error: " + err.message; this.done = true; showError(err); break; }
      }
      if (this.done) break;
      this.reconnects += 1;
      this.state = "reconnecting after seq " + this.seq;
      this.render(false);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
    persistWatchers();
    this.render(false);
  }

  close() {
    this.abort.abort();
    this.el.remove();
    watchers.delete(this.wid);
    persistWatchers();
  }
}

function openWatcher(run, saved) {
  const w = new Watcher(run, saved);
  watchers.set(w.wid, w);
  persistWatchers();
  w.follow();
  return w;
}

async function startRun() {
  showError(null);
  $("#start-btn").disabled = true;
  try {
    const started = await api("POST", "/v1/messages/async", requestBody());
    openWatcher(started.message_id);
    refreshRuns();
  } catch (err) {
    showError(err);
  } finally {
    $("#start-btn").disabled = false;
  }
}

// ---------------------------------------------------------------- runs list (when the server has one)

async function refreshRuns() {
  const panel = $("#runs-panel");
  let page;
  try {
    const resp = await fetch("/v1/messages/async?limit=20", { headers: headers(false) });
    if (!resp.ok) { panel.hidden = true; return; } // no listing endpoint (or no access): no panel
    page = await resp.json();
  } catch {
    panel.hidden = true;
    return;
  }
  if (!page || !Array.isArray(page.data)) { panel.hidden = true; return; }
  const body = $("#runs tbody");
  body.textContent = "";
  for (const run of page.data) {
    const tr = document.createElement("tr");
    const cells = [run.message_id, run.status, (run.metadata || {}).model || "", run.created_at || ""];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.type = "button"; b.className = "small"; b.textContent = "watch";
    b.onclick = () => openWatcher(run.message_id);
    td.appendChild(b); tr.appendChild(td); body.appendChild(tr);
  }
  panel.hidden = false;
}

// ---------------------------------------------------------------- start-up

async function loadModels() {
  try {
    const models = await api("GET", "/v1/models");
    const sel = $("#model");
    const chosen = loadState().model || "";
    sel.length = 1;
    for (const m of models.data) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = m.id + (m.default ? " (default)" : "");
      sel.appendChild(o);
    }
    sel.value = [...sel.options].some((o) => o.value === chosen) ? chosen : "";
  } catch (err) {
    if (err.status === 401) showError(new Error("Enter an API key: this server requires one."));
  }
}

function init() {
  const st = loadState();
  $("#api-key").value = st.apiKey || "";
  $("#tenant").value = st.tenant || "";
  if (st.maxTokens) $("#max-tokens").value = st.maxTokens;
  if (st.prompt) $("#prompt").value = st.prompt;
  if (st.system) $("#system").value = st.system;
  const remember = () => saveState({
    apiKey: $("#api-key").value, tenant: $("#tenant").value, maxTokens: $("#max-tokens").value,
    model: $("#model").value, prompt: $("#prompt").value, system: $("#system").value,
  });
  for (const id of ["#api-key", "#tenant", "#max-tokens", "#model", "#prompt", "#system"]) $(id).addEventListener("change", remember);
  $("#api-key").addEventListener("change", () => { loadModels(); refreshRuns(); });
  $("#chat-btn").onclick = chat;
  $("#start-btn").onclick = startRun;
  $("#watch-btn").onclick = () => { const id = $("#watch-id").value.trim(); if (id) openWatcher(id); };
  $("#runs-refresh").onclick = refreshRuns;
  for (const saved of st.watchers || []) openWatcher(saved.run, saved);
  loadModels();
  refreshRuns();
}

document.addEventListener("DOMContentLoaded", init);
