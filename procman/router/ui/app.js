// llamactl's dashboard. Every figure comes from the router's documented endpoints
// (/admin/status?follow=1, /admin/events, /admin/logs/NAME?follow=1, /admin/machine,
// /v1/chat/completions); the API key, if the router has one, is kept in this tab's
// sessionStorage only and sent as a header (never in a URL).
"use strict";

const KEY = "llamactl.key";
const HISTORY_S = 300; // seconds of samples the charts keep
const COLOURS = ["#2b6cb0", "#c05621", "#2f855a", "#805ad5", "#b83280", "#2c7a7b", "#975a16"];
const $ = (sel) => document.querySelector(sel);

class Unauthorised extends Error {}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h.set("Authorization", "Bearer " + key);
  return h;
}

async function api(path, init) {
  const opts = Object.assign({}, init || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  if (res.status === 401) {
    askForKey();
    throw new Unauthorised("the router needs its API key");
  }
  return res;
}

function askForKey() {
  $("#login").hidden = false;
  $("#logout").hidden = true;
  setConn("API key needed");
}

function setConn(text) { $("#conn").textContent = text; }

// Each line of a streamed answer's body as it arrives (without its line end).
async function* lines(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, at).replace(/\r$/, "");
      buffer = buffer.slice(at + 1);
    }
  }
}

// Server-sent events over fetch (EventSource cannot send the key): calls onMessage with
// each message's data until the stream ends; reconnects after a pause while the page lives.
function follow(path, onMessage, onOpen) {
  const state = { controller: null, stopped: false };
  async function run() {
    let pause = 500;
    while (!state.stopped) {
      state.controller = new AbortController();
      try {
        const res = await api(path, { signal: state.controller.signal });
        if (!res.ok) throw new Error(path + ": HTTP " + res.status);
        pause = 500;
        if (onOpen) onOpen();
        let data = [];
        for await (const line of lines(res)) {
          if (line === "") {
            if (data.length) onMessage(data.join("\n"));
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          }
        }
      } catch (err) {
        if (state.stopped) return;
        if (err instanceof Unauthorised) return; // started again once a key is given
      }
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 5000);
    }
  }
  run();
  return () => { state.stopped = true; if (state.controller) state.controller.abort(); };
}

// -- formatting ---------------------------------------------------------------------------
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}
function num(n, digits) { return n === null || n === undefined ? "–" : n.toFixed(digits); }
function age(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
const colours = new Map();
function colour(name) {
  if (!colours.has(name)) colours.set(name, COLOURS[colours.size % COLOURS.length]);
  return colours.get(name);
}

// -- models ---------------------------------------------------------------------------------
let models = [];

async function act(name, action) {
  const error = $("#action-error");
  error.hidden = true;
  const steps = action === "restart" ? ["unload", "load"] : [action];
  try {
    for (const step of steps) {
      const res = await api("/admin/" + step + "/" + encodeURIComponent(name), { method: "POST" });
      if (!res.ok) {
        const body = await res.json().catch(() => ({}));
        throw new Error((body.error && body.error.message) || "HTTP " + res.status);
      }
    }
  } catch (err) {
    error.textContent = name + ": " + action + " failed: " + err.message;
    error.hidden = false;
  }
}

function modelRow(m, now) {
  const q = m.queue || {};
  const state = el("td", { class: "state " + m.state, text: m.state });
  const since = m.state_since ? " for " + age(now - m.state_since) : "";
  const detail = [m.reason, m.pulling, m.refused ? "refused: " + m.refused : ""].filter(Boolean);
  state.title = detail.join("\n");
  const info = el("div", { class: "dim", text: since.trim() + (m.on_demand && m.state === "stopped" ? " · on demand" : "") });
  state.append(info);
  const name = el("td", {}, el("b", { text: m.name }));
  if (m.aliases && m.aliases.length) name.append(el("div", { class: "dim", text: m.aliases.join(", ") }));
  const buttons = el("td", {});
  const running = !["stopped", "failed"].includes(m.state);
  for (const action of running ? ["unload", "restart"] : ["load"]) {
    const b = el("button", { type: "button", "data-action": action, text: action });
    b.addEventListener("click", () => act(m.name, action));
    buttons.append(b, " ");
  }
  const queue = q.waiting === undefined ? "–" : q.waiting + " waiting · " + q.active + "/" + q.slots + " in flight · " + q.order;
  return el("tr", { "data-model": m.name },
    name, state,
    el("td", { class: "num", text: m.pid ?? "–" }),
    el("td", { class: "num", text: bytes(m.rss_bytes) + " / " + bytes(m.pss_bytes) }),
    el("td", { class: "num", text: bytes(m.vram_bytes) }),
    el("td", { class: "num", text: m.cpu_percent === null ? "–" : num(m.cpu_percent, 0) + " %" }),
    el("td", { class: "num", text: num(m.tokens_per_second, 1) }),
    el("td", { text: queue }),
    el("td", { class: "num", text: m.restarts }),
    el("td", { class: "dim", text: m.last_exit || "" }),
    buttons);
}

function renderModels(sample) {
  const body = $("#models tbody");
  body.replaceChildren(...sample.models.map((m) => modelRow(m, sample.time)));
  if (!performance.getEntriesByName("llamactl:first-sample").length) {
    performance.mark("llamactl:first-sample"); // the bench reads it: page opened -> live data
  }
  const names = sample.models.map((m) => m.name);
  if (names.join() !== models.join()) {
    models = names;
    for (const select of [$("#log-model"), $("#play-model")]) {
      const chosen = select.value;
      select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
      if (names.includes(chosen)) select.value = chosen;
    }
    followLog();
  }
}

// -- memory -----------------------------------------------------------------------------------
function memoryBar(title, budget, reason, rows) {
  const box = el("div", { class: "budget" });
  const total = budget || rows.reduce((s, r) => s + r.held, 0) || 1;
  const used = rows.reduce((s, r) => s + r.held, 0);
  box.append(el("div", {}, el("b", { text: title + ": " }),
    bytes(used) + " held of " + (budget ? bytes(budget) : "no limit"),
    el("span", { class: "dim", text: reason ? " (" + reason + ")" : "" })));
  const bar = el("div", { class: "bar" });
  for (const r of rows) {
    const part = el("span", { title: r.name + ": " + bytes(r.held) });
    part.style.width = (100 * r.held / total).toFixed(2) + "%";
    part.style.background = colour(r.name);
    bar.append(part);
  }
  box.append(bar);
  const legend = el("div", { class: "legend" });
  for (const r of rows) {
    legend.append(el("span", {}, el("i", { class: "swatch" }), r.name + ": estimate " +
      bytes(r.estimate) + ", measured " + bytes(r.measured)));
    legend.lastChild.firstChild.style.background = colour(r.name);
  }
  box.append(legend);
  return box;
}

function renderMemory(sample) {
  const memory = sample.memory;
  const box = $("#memory");
  if (!memory) { box.replaceChildren(el("p", { class: "dim", text: "no memory budget" })); return; }
  const held = memory.held || {};
  const byName = new Map(sample.models.map((m) => [m.name, m]));
  const rows = (vram) => Object.entries(held).map(([name, h]) => {
    const m = byName.get(name) || {};
    return { name, held: vram ? h.vram_bytes : h.bytes,
      estimate: vram ? m.estimate_vram_bytes : m.estimate_bytes,
      measured: vram ? m.vram_bytes : m.rss_bytes };
  });
  const b = memory.budget, machine = memory.machine;
  const parts = [memoryBar("Host memory", b.memory_bytes, b.memory_reason, rows(false))];
  if (b.vram_bytes || machine.vram_total_bytes) {
    parts.push(memoryBar("VRAM", b.vram_bytes, b.vram_reason, rows(true)));
  }
  parts.push(el("p", { class: "dim", text: "admissions " + memory.admissions + " · evictions " +
    memory.evictions + " · refusals " + memory.refusals }));
  for (const m of sample.models) {
    if (m.refused) parts.push(el("p", { class: "error", text: m.name + " refused: " + m.refused }));
  }
  box.replaceChildren(...parts);
}

// -- charts -----------------------------------------------------------------------------------
const series = new Map(); // model -> [{t, tps, rss, queue}]
const CHARTS = [
  ["tps", "tokens/s", (v) => num(v, 1)],
  ["rss", "RSS", bytes],
  ["queue", "queue depth", (v) => String(v)],
];

function record(sample) {
  for (const m of sample.models) {
    if (!series.has(m.name)) series.set(m.name, []);
    const points = series.get(m.name);
    points.push({ t: sample.time, tps: m.tokens_per_second || 0, rss: m.rss_bytes || 0,
      queue: m.queue ? m.queue.waiting : 0 });
    while (points.length && points[0].t < sample.time - HISTORY_S) points.shift();
  }
}

function renderCharts(now) {
  const box = $("#charts");
  if (!box.children.length) {
    for (const [key, title] of CHARTS) {
      box.append(el("div", { class: "chart", "data-chart": key },
        el("div", { class: "title", text: title }),
        document.createElementNS("http://www.w3.org/2000/svg", "svg")));
    }
  }
  for (const [key, , format] of CHARTS) {
    const chart = box.querySelector('[data-chart="' + key + '"]');
    const svg = chart.querySelector("svg");
    svg.setAttribute("viewBox", "0 0 300 80");
    svg.setAttribute("preserveAspectRatio", "none");
    let max = 0, oldest = now - 60;
    for (const points of series.values()) {
      for (const p of points) { max = Math.max(max, p[key]); oldest = Math.min(oldest, p.t); }
    }
    const span = Math.max(now - oldest, 1);
    const lines = [];
    for (const [name, points] of series) {
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", colour(name));
      line.setAttribute("stroke-width", "1.5");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      line.setAttribute("points", points.map((p) =>
        (300 * (1 - (now - p.t) / span)).toFixed(1) + "," +
        (78 - 74 * (max ? p[key] / max : 0)).toFixed(1)).join(" "));
      lines.push(line);
    }
    svg.replaceChildren(...lines);
    chart.querySelector(".title").textContent =
      chart.querySelector(".title").textContent.split(" (")[0] + " (max " + format(max) + ", last " + age(span) + ")";
  }
}

// -- events -------------------------------------------------------------------------------------
function addEvent(text) {
  const e = JSON.parse(text);
  const list = $("#events");
  const line = e.time.slice(11, 19) + " " + (e.model || "llamactl") + " " + e.event +
    (e.reason ? ": " + e.reason : "");
  list.prepend(el("li", { class: e.level, "data-event": e.event, text: line }));
  while (list.children.length > 200) list.lastChild.remove();
}

// -- logs ---------------------------------------------------------------------------------------
let stopLog = null;
function followLog() {
  const name = $("#log-model").value;
  if (stopLog) stopLog();
  const pre = $("#log-lines");
  pre.textContent = "";
  if (!name) return;
  stopLog = follow("/admin/logs/" + encodeURIComponent(name) + "?follow=1&lines=200", (line) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(line + "\n");
    while (pre.childNodes.length > 2000) pre.firstChild.remove();
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }, () => { pre.textContent = ""; });
}

// -- machine and build ----------------------------------------------------------------------------
async function loadMachine() {
  const res = await api("/admin/machine");
  if (!res.ok) return;
  const data = await res.json();
  const box = $("#machine");
  const m = data.machine || {};
  const cpu = m.cpu || {};
  const parts = [el("p", {}, el("b", { text: "CPU: " }),
    [cpu.model || cpu.brand || "", cpu.arch || "", (cpu.features || []).join(" ")].filter(Boolean).join(" · "))];
  const gpus = m.gpus || [];
  parts.push(el("p", {}, el("b", { text: "GPUs: " }), gpus.length ?
    gpus.map((g) => (g.name || g.vendor || "gpu") + (g.memory_bytes ? " " + bytes(g.memory_bytes) : "")).join(", ") :
    "none found"));
  const seen = new Set();
  for (const [name, build] of Object.entries(data.builds || {})) {
    if (!build) { parts.push(el("p", { class: "dim", text: name + ": not a llamactl build" })); continue; }
    const title = el("h3", { text: "build " + build.key + " (" + build.backend + ")" });
    if (seen.has(build.key)) continue; // listed under its build's "used by"
    seen.add(build.key);
    parts.push(title, el("p", { class: "dim", text: "used by " + Object.entries(data.builds)
      .filter(([, b]) => b && b.key === build.key).map(([n]) => n).join(", ") + " · " + build.binary }));
    const table = el("table", {});
    const flags = el("details", {}, el("summary", { text: "cmake flags and why" }), table);
    for (const [flag, value] of Object.entries(build.defines)) {
      table.append(el("tr", {}, el("td", { text: flag + "=" + value }),
        el("td", { class: "dim", text: build.reasons[flag] || "" })));
    }
    parts.push(flags);
  }
  box.replaceChildren(...parts);
}

// -- playground -------------------------------------------------------------------------------------
async function play(event) {
  event.preventDefault();
  const answer = $("#play-answer"), timings = $("#play-timings"), send = $("#play-send");
  answer.textContent = "";
  timings.textContent = "";
  send.disabled = true;
  const started = performance.now();
  let first = null, server = null;
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("#play-model").value, stream: true, max_tokens: 256,
        messages: [{ role: "user", content: $("#play-prompt").value }] }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + res.status);
    }
    for await (const raw of lines(res)) {
      const line = raw.trim();
      if (!line.startsWith("data:") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(5));
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        answer.append(delta.content);
      }
      if (chunk.timings) server = chunk.timings;
    }
    const total = performance.now() - started;
    const parts = ["first token " + (first === null ? "–" : Math.round(first - started) + " ms"),
      "total " + Math.round(total) + " ms"];
    if (server) {
      parts.push("prompt " + server.prompt_n + " tokens at " + num(server.prompt_per_second, 1) + " tok/s");
      parts.push("answer " + server.predicted_n + " tokens at " + num(server.predicted_per_second, 1) + " tok/s");
    }
    timings.textContent = parts.join(" · ");
  } catch (err) {
    timings.textContent = "failed: " + err.message;
  } finally {
    send.disabled = false;
  }
}

// -- start --------------------------------------------------------------------------------------------
let stops = [];
function start() {
  for (const stop of stops) stop();
  stops = [
    follow("/admin/status?follow=1&interval=1", (text) => {
      const sample = JSON.parse(text);
      setConn("live · " + sample.models.length + " model(s)");
      record(sample);
      renderModels(sample);
      renderMemory(sample);
      renderCharts(sample.time);
    }),
    follow("/admin/events?history=50", addEvent, () => { $("#events").replaceChildren(); }),
  ];
  loadMachine().catch(() => {});
  $("#logout").hidden = !sessionStorage.getItem(KEY);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("#key").value);
    $("#key").value = "";
    $("#login").hidden = true;
    start();
    followLog();
  });
  $("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
  $("#log-model").addEventListener("change", followLog);
  $("#play").addEventListener("submit", play);
  start();
});
