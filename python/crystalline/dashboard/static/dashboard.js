// The Crystalline dashboard's script: polls the JSON API of app.py and draws
// the runs list, the curves, the kissing spheres, the symmetry groups, the
// checkpoints and the prompt box as plain SVG and HTML. No libraries.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_METRICS_MS = 1000;
const POLL_SUMMARY_MS = 2000;
const POLL_RUNS_MS = 5000;
const CHART = { width: 480, height: 220, left: 56, right: 12, top: 10, bottom: 26 };

const state = { run: null, generation: -1, records: [], timers: [] };

function $(id) { return document.getElementById(id); }

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

// A number for people: `digits` decimals if given, else three significant digits.
function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (digits !== undefined) return x.toFixed(digits);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return a >= 1000 ? x.toFixed(0) : String(Number(x.toPrecision(3)));
}

function ago(seconds) {
  if (!seconds) return "";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  return s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

// -- charts ------------------------------------------------------------------

// Draws series [{name, points: [[x, y], ...], dots}] into an SVG chart with
// axes and ticks; each series' polyline carries data-count, its point count.
function lineChart(svg, series) {
  clear(svg);
  const { width, height, left, right, top, bottom } = CHART;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  if (!all.length) {
    svg.appendChild(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
      "no data yet"));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.appendChild(el("line", { x1: left, x2: width - right, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.appendChild(el("text", { x: left - 4, y: sy(y) + 3, "text-anchor": "end", class: "tick" }, fmt(y)));
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    svg.appendChild(el("text", { x: sx(x), y: height - 8, "text-anchor": "middle", class: "tick" }, fmt(x, 0)));
  }
  svg.appendChild(el("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
  svg.appendChild(el("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const line = el("polyline", {
      class: `series series-${s.name}`, "data-count": pts.length,
      points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
    });
    svg.appendChild(line);
    if (!s.dots) continue;
    for (const p of pts) svg.appendChild(el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `dot-${s.name}` }));
  }
}

function drawCurves() {
  const r = state.records;
  const pick = (key) => r.filter((x) => key in x).map((x) => [x.step, x[key]]);
  lineChart($("loss-chart"), [{ name: "train", points: pick("loss") },
    { name: "val", points: pick("val_loss"), dots: true }]);
  lineChart($("lr-chart"), [{ name: "lr", points: pick("lr") }]);
  lineChart($("grad-chart"), [{ name: "grad", points: pick("grad_norm") }]);
  lineChart($("tps-chart"), [{ name: "tps", points: pick("tokens_per_s") }]);
}

// -- the kissing spheres and the symmetry groups ---------------------------------

// Node Zero at the centre, the workers on a ring around it; each sphere shows
// its number and its busy share of the epoch's compute time.
function drawSpheres(layout) {
  const svg = $("spheres");
  clear(svg);
  if (!layout) {
    svg.appendChild(el("text", { x: 160, y: 160, "text-anchor": "middle", class: "empty" }, "no steps yet"));
    return;
  }
  const n = layout.busy_s.length;
  const [cx, cy, ring] = [160, 160, 112];
  for (let i = 0; i < n; i++) {
    const angle = ((i - 1) / Math.max(n - 1, 1)) * 2 * Math.PI - Math.PI / 2;
    const [x, y] = i === 0 ? [cx, cy] : [cx + ring * Math.cos(angle), cy + ring * Math.sin(angle)];
    const share = layout.busy_share ? layout.busy_share[i] : null;
    const g = el("g", { class: i === 0 ? "sphere node-zero" : "sphere", "data-sphere": i });
    const fill = `rgba(47, 158, 111, ${(0.12 + 0.78 * Math.min(share || 0, 1)).toFixed(2)})`;
    g.appendChild(el("circle", { cx: x, cy: y, r: i === 0 ? 38 : 30, fill }));
    const name = i === 0 ? "Node Zero" : `sphere ${i}`;
    g.appendChild(el("text", { x, y: y - 6, "text-anchor": "middle", class: "label" }, name));
    const figure = share === null ? `${fmt(layout.busy_s[i], 2)} s` : `${(100 * share).toFixed(0)}%`;
    g.appendChild(el("text", { x, y: y + 10, "text-anchor": "middle", class: "figure" }, figure));
    g.appendChild(el("title", {}, `${name}: busy ${fmt(layout.busy_s[i], 3)} s`));
    svg.appendChild(g);
  }
  $("layout-epoch").textContent = `epoch ${layout.epoch} (${layout.steps} steps)`;
}

function drawGroups(layout) {
  const svg = $("groups");
  clear(svg);
  if (!layout || !layout.groups) {
    svg.appendChild(el("text", { x: 240, y: 110, "text-anchor": "middle", class: "empty" }, "no counts yet"));
    return;
  }
  const counts = layout.groups;
  const total = counts.reduce((a, b) => a + b, 0);
  const top = Math.max(...counts, 1);
  const [left, base, height, slot] = [20, 180, 150, 440 / counts.length];
  counts.forEach((c, g) => {
    const h = (c / top) * height;
    const x = left + g * slot + slot * 0.15;
    svg.appendChild(el("rect", { x, y: base - h, width: slot * 0.7, height: h, class: "group-bar", "data-count": c }));
    svg.appendChild(el("text", { x: x + slot * 0.35, y: base - h - 4, "text-anchor": "middle", class: "tick" }, c));
    svg.appendChild(el("text", { x: x + slot * 0.35, y: base + 14, "text-anchor": "middle", class: "tick" }, g));
  });
  svg.appendChild(el("line", { x1: left, x2: left + 440, y1: base, y2: base, class: "axis" }));
  svg.appendChild(el("text", { x: 240, y: 212, "text-anchor": "middle", class: "tick" },
    `group = token id % 12 · ${total} sequences`));
  $("groups-epoch").textContent = `epoch ${layout.epoch}`;
}

// -- the run's summary --------------------------------------------------------

function drawCheckpoints(checkpoints) {
  const body = $("checkpoints").querySelector("tbody");
  clear(body);
  for (const c of checkpoints) {
    const v = c.validate || {};
    const cells = [c.name, c.step, fmt(c.train_loss, 4), fmt(c.val_loss, 4),
      v.syntax_rate === undefined || v.syntax_rate === null ? "–" : `${(100 * v.syntax_rate).toFixed(0)}%`,
      fmt(v.distinct_2, 3), fmt(v.mean_log_likelihood, 3), fmt(v.perplexity, 2)];
    const row = document.createElement("tr");
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.appendChild(td);
    }
    body.appendChild(row);
  }
}

function drawSummary(s) {
  const m = s.model;
  const shape = m ? `${m.parameters.toLocaleString()} parameters (V=${m.vocab_size}, C=${m.n_embd}, L=${m.n_layer}, ` +
    `NH=${m.n_head}, T=${m.block_size}), ${m.threads} sphere threads · ` : "";
  $("run-info").textContent = `${shape}${s.steps} steps · updated ${ago(s.updated)} · ${s.path}`;
  const warning = $("run-warning");
  warning.hidden = !s.bad_lines;
  warning.textContent = s.bad_lines ? `${s.bad_lines} line(s) of metrics.jsonl are no record and were skipped` : "";
  drawSpheres(s.layout);
  drawGroups(s.layout);
  drawCheckpoints(s.checkpoints);
}

// -- polling ------------------------------------------------------------------

async function pollMetrics() {
  const name = state.run;
  const q = `name=${encodeURIComponent(name)}&after=${state.records.length}&generation=${state.generation}`;
  const m = await api(`/api/metrics?${q}`);
  if (name !== state.run) return;
  if (m.generation !== state.generation || m.start !== state.records.length) {
    state.records = state.records.slice(0, m.start);
  }
  state.generation = m.generation;
  if (m.records.length || m.start === 0) {
    state.records = state.records.concat(m.records);
    drawCurves();
  }
}

async function pollSummary() {
  const name = state.run;
  const s = await api(`/api/run?name=${encodeURIComponent(name)}`);
  if (name === state.run) drawSummary(s);
}

async function pollRuns() {
  const r = await api("/api/runs");
  $("root").textContent = r.root;
  const list = $("runs");
  clear(list);
  $("no-runs").hidden = r.runs.length > 0;
  for (const run of r.runs) {
    const li = document.createElement("li");
    li.textContent = run.label;
    li.dataset.name = run.name;
    li.className = run.name === state.run ? "selected" : "";
    const info = document.createElement("span");
    info.className = "muted";
    info.textContent = `${run.steps} steps · loss ${fmt(run.loss, 3)} · ${ago(run.updated)}`;
    li.appendChild(info);
    li.addEventListener("click", () => select(run.name));
    list.appendChild(li);
  }
  // A link that names a run (#run=NAME) waits for it, as when the page is
  // opened just before the run starts; without one the latest run shows.
  const wanted = decodeURIComponent(location.hash.replace(/^#run=/, ""));
  $("waiting").hidden = state.run !== null || !wanted || r.runs.some((x) => x.name === wanted);
  $("waiting-name").textContent = wanted;
  if (state.run === null && r.runs.length && $("waiting").hidden) {
    const latest = r.runs.reduce((a, b) => ((b.updated || 0) > (a.updated || 0) ? b : a));
    select(wanted || latest.name);
  }
}

// Runs `task` now and then every `ms`, never two at once; errors go to the status line.
function every(ms, task) {
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await task(); } catch (err) { $("sample-status").textContent = `update failed: ${err.message}`; }
    busy = false;
  };
  tick();
  return setInterval(tick, ms);
}

function select(name) {
  state.timers.forEach(clearInterval);
  Object.assign(state, { run: name, generation: -1, records: [] });
  $("waiting").hidden = true;
  location.hash = `run=${encodeURIComponent(name)}`;
  $("run").hidden = false;
  $("run-name").textContent = name;
  for (const li of $("runs").children) li.className = li.dataset.name === name ? "selected" : "";
  drawCurves();
  state.timers = [every(POLL_METRICS_MS, pollMetrics), every(POLL_SUMMARY_MS, pollSummary)];
}

// -- the prompt box -------------------------------------------------------------

async function sample(event) {
  event.preventDefault();
  const seed = $("seed").value;
  const body = {
    name: state.run, prompt: $("prompt").value, max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value), seed: seed === "" ? null : Number(seed),
  };
  $("sample-status").textContent = "sampling…";
  $("sample-button").disabled = true;
  try {
    const r = await api("/api/sample", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    $("sample-prompt").textContent = body.prompt;
    $("sample-text").textContent = r.text;
    $("sample-status").textContent = `from ${r.checkpoint} (step ${r.step})`;
  } catch (err) {
    $("sample-status").textContent = `error: ${err.message}`;
  } finally {
    $("sample-button").disabled = false;
  }
}

$("sample-form").addEventListener("submit", sample);
every(POLL_RUNS_MS, pollRuns);
