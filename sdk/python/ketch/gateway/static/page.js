// Ketch's status page: polls /ui/status.json every second, keeps two minutes of history,
// draws p99 latency and throughput per app on two canvases, and gives each app a form
// that posts to the gateway's /{app}/predict. Plain browser JavaScript, no dependencies.
"use strict";

const POLL_MS = 1000;
const KEEP = 120;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const history = {}; // app -> [{t, p99, qps}]
const last = {};    // app -> {t, queries}
const forms = {};   // app -> form element

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function shapeText(shape) {
  return shape.length ? "[" + shape.map(d => (d < 0 ? "any" : d)).join(",") + "]" : "scalar";
}

function exampleInput(type, shape) {
  if (type === "string") return "hello";
  if (type === "bytes") return "aGVsbG8=";
  if (type === "json") return {x: 1};
  const zero = type === "bool" ? false : 0;
  const fill = dims => (dims.length ? Array.from({length: dims[0] > 0 ? dims[0] : 3}, () => fill(dims.slice(1))) : zero);
  return fill(shape);
}

function ms(v) {
  return v === null || v === undefined || Number.isNaN(v) ? "-" : v.toFixed(2);
}

function colorOf(app, apps) {
  return COLORS[apps.indexOf(app) % COLORS.length];
}

function record(doc) {
  const now = Date.now() / 1000;
  for (const a of doc.apps) {
    const prev = last[a.name];
    const qps = prev && now > prev.t ? Math.max(0, (a.queries - prev.queries) / (now - prev.t)) : 0;
    last[a.name] = {t: now, queries: a.queries};
    const series = (history[a.name] = history[a.name] || []);
    series.push({t: now, p99: Number.isFinite(a.p99_ms) ? a.p99_ms : 0, qps});
    if (series.length > KEEP) series.shift();
  }
}

function draw(canvasId, key, apps) {
  const canvas = document.getElementById(canvasId);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 48, bottom = 20, top = 10, right = 10;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, w, h);
  let max = 0;
  for (const app of apps) for (const p of history[app] || []) max = Math.max(max, p[key]);
  max = max > 0 ? max * 1.15 : 1;
  ctx.strokeStyle = "#d5d9e0";
  ctx.fillStyle = "#5a6474";
  ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((h - top - bottom) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(w - right, y);
    ctx.stroke();
    ctx.fillText((max * (1 - i / 4)).toPrecision(3), 2, y + 4);
  }
  ctx.fillText("last " + KEEP + " s", w - right - 60, h - 4);
  const x = i => left + ((w - left - right) * i) / (KEEP - 1);
  const y = v => top + (h - top - bottom) * (1 - v / max);
  for (const app of apps) {
    const series = history[app] || [];
    if (!series.length) continue;
    const offset = KEEP - series.length;
    ctx.strokeStyle = colorOf(app, apps);
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach((p, i) => (i ? ctx.lineTo(x(offset + i), y(p[key])) : ctx.moveTo(x(offset + i), y(p[key]))));
    if (series.length === 1) ctx.lineTo(x(offset) + 2, y(series[0][key]));
    ctx.stroke();
  }
}

function cell(text, cls) {
  const td = el("td", cls ? {class: cls} : {}, text);
  return td;
}

function renderTables(doc) {
  const apps = document.querySelector("#apps tbody");
  apps.replaceChildren(
    ...doc.apps.map(a =>
      el("tr", {"data-app": a.name},
        cell(a.name), cell(a.ready ? "yes" : "no: " + a.not_ready.join(", "), a.ready ? "yes" : "no"),
        cell(a.input_type + " " + shapeText(a.input_shape)), cell(a.slo_ms), cell(a.policy),
        cell(a.models.join(", ") || "-"), cell(a.queries), cell(a.errors), cell(a.defaults), cell(ms(a.p99_ms))))
  );
  const models = document.querySelector("#models tbody");
  const rows = [];
  for (const m of doc.models) {
    for (const v of m.versions) {
      rows.push(el("tr", {"data-model": m.name},
        cell(m.name), cell(v.version), cell(v.active ? "*" : ""), cell(v.replicas),
        cell(v.ready, v.ready ? "yes" : "no"), cell(v.active ? m.queue_depth : ""),
        cell(v.active ? m.batches : ""), cell(v.active ? m.errors : "")));
    }
  }
  models.replaceChildren(...rows);
  const b = doc.broker;
  document.getElementById("broker").textContent =
    `broker pid ${b.pid}, up ${Math.round(b.uptime_s)} s, clients ${b.endpoints.frontend}, ` +
    `${b.pending} pending` + (doc.gateways.length ? ` | HTTP ${doc.gateways.join(", ")}` : "");
  const legend = document.getElementById("legend");
  const names = doc.apps.map(a => a.name);
  legend.replaceChildren(...names.map(n => {
    const swatch = el("i");
    swatch.style.background = colorOf(n, names);
    return el("span", {}, swatch, n);
  }));
}

function renderForms(doc) {
  const box = document.getElementById("try");
  for (const a of doc.apps) {
    if (forms[a.name]) continue;
    const area = el("textarea", {name: "input", "aria-label": "input for " + a.name});
    area.value = JSON.stringify(exampleInput(a.input_type, a.input_shape));
    const out = el("pre", {class: "result"}, "");
    const form = el("form", {class: "try", "data-app": a.name},
      el("strong", {}, a.name), " ", el("span", {class: "muted"}, a.input_type + " " + shapeText(a.input_shape)),
      el("br"), area, el("br"), el("button", {type: "submit"}, "predict"), out);
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      out.textContent = "...";
      let input;
      try {
        input = JSON.parse(area.value);
      } catch (e) {
        out.textContent = "not JSON: " + e.message;
        return;
      }
      const started = performance.now();
      try {
        const res = await fetch("/" + encodeURIComponent(a.name) + "/predict", {
          method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({input}),
        });
        const text = await res.text();
        out.textContent = `HTTP ${res.status} in ${(performance.now() - started).toFixed(1)} ms\n` + text;
      } catch (e) {
        out.textContent = "request failed: " + e.message;
      }
    });
    forms[a.name] = form;
    box.append(form);
  }
}

async function poll() {
  const error = document.getElementById("error");
  try {
    const res = await fetch("/ui/status.json", {cache: "no-store"});
    const doc = await res.json();
    if (!res.ok) throw new Error(doc.error || "HTTP " + res.status);
    error.hidden = true;
    record(doc);
    renderTables(doc);
    renderForms(doc);
    const names = doc.apps.map(a => a.name);
    draw("p99", "p99", names);
    draw("qps", "qps", names);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    error.textContent = "the broker does not answer: " + e.message;
    error.hidden = false;
  }
  setTimeout(poll, POLL_MS);
}

poll();
