// The streamflow dashboard. On load it fetches the daemon's last 15 minutes of series
// (/api/history), then every two seconds only what is newer, with the pipeline's state
// (/api/status) and its newest dead letters (/api/dead-letters). Charts are uPlot (vendored
// beside this file); nothing is loaded from elsewhere. Text from the daemon (names, dead-letter
// keys, values and headers) is always set as text, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#4fb3ff", "#ffb84f", "#7ee081", "#ff6f91", "#c39bff", "#5ce1e6", "#f9f871"];
const STATE_COLORS = {
  running: "#1f7a3a", finished: "#7d8b99", failed: "#c0392b", "not started": "#3b4a58",
};
const DEAD_LETTER_COLOR = "#d9822b";
const SVG = "http://www.w3.org/2000/svg";

// --- number formats ----------------------------------------------------------------------

const compactFormat = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
const wholeFormat = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });

function compact(value) {  // 2357.5 → 2.4K
  return compactFormat.format(value);
}

function duration(seconds) {  // 0.0352 → 35 ms
  if (seconds === 0) return "0";
  if (seconds < 0.01) return `${(seconds * 1000).toFixed(1)} ms`;
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  return seconds < 60 ? `${seconds.toFixed(seconds < 10 ? 2 : 1)} s` : `${(seconds / 60).toFixed(1)} min`;
}

function figure(value) {  // model metrics: three significant digits
  return Math.abs(value) >= 1000 ? compact(value) : String(Number(value.toPrecision(3)));
}

const clockFormat = new Intl.DateTimeFormat(undefined,
  { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

function clock(unixSeconds) {  // 19:02:05, on the time axis and in the legend
  return clockFormat.format(new Date(unixSeconds * 1000));
}

function last(column) {
  for (let i = column.length - 1; i >= 0; i--) if (column[i] !== null) return column[i];
  return null;
}

// --- history -----------------------------------------------------------------------------

const CHARTS = {
  throughput: { format: compact, unit: " /s", fromZero: true },
  lag: { format: compact, unit: "", fromZero: true },
  dead_letters: { format: compact, unit: " /s", fromZero: true },
  latency: { format: duration, unit: "", fromZero: true, spanGaps: true },
  model: { format: figure, unit: "", fromZero: false },
};

const history = { t: [], windowS: 900, totals: {}, charts: {}, champions: {} };
for (const chart of Object.keys(CHARTS)) history.charts[chart] = {};

// Append a /api/history document's columns, then drop what is older than the window.
function merge(doc) {
  const before = history.t.length, added = doc.t.length;
  history.windowS = doc.window_s;
  history.totals = doc.totals;
  history.champions = doc.champions || {};
  if (!added) return;
  history.t.push(...doc.t);
  for (const [chart, series] of Object.entries(history.charts)) {
    const incoming = doc.charts[chart] || {};
    for (const name of Object.keys(incoming)) {
      if (!series[name]) series[name] = new Array(before).fill(null);
    }
    for (const [name, column] of Object.entries(series)) {
      column.push(...(incoming[name] || new Array(added).fill(null)));
    }
  }
  const cutoff = history.t[history.t.length - 1] - history.windowS;
  let drop = 0;
  while (drop < history.t.length && history.t[drop] <= cutoff) drop++;
  if (drop) {
    history.t.splice(0, drop);
    for (const series of Object.values(history.charts)) {
      for (const column of Object.values(series)) column.splice(0, drop);
    }
  }
}

const RECENT_SAMPLES = 5;

// The mean of a series' last RECENT_SAMPLES values (null if it has none): one-second rates are
// noisy where records come in bursts.
function recent(chart, name) {
  const values = (history.charts[chart][name] || []).slice(-RECENT_SAMPLES).filter(v => v !== null);
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

// --- charts ------------------------------------------------------------------------------

class Plot {
  constructor(chart) {
    this.chart = chart;
    this.options = CHARTS[chart];
    this.element = document.getElementById(`chart-${chart}`);
    this.names = null;  // the series' labels, joined, that the plot was built with
    this.plot = null;
  }

  update() {
    const series = history.charts[this.chart];
    const names = Object.keys(series).sort();
    const data = [history.t, ...names.map(name => series[name])];
    const labels = names.map(name => this.label(name));
    if (this.plot && labels.join("\n") === this.names) {
      this.plot.setData(data);
    } else {
      this.build(labels, data);
    }
    const element = this.element;
    element.dataset.points = String(names.reduce(
      (sum, name) => sum + series[name].filter(v => v !== null).length, 0));
    element.dataset.last = JSON.stringify(Object.fromEntries(names.map(n => [n, last(series[n])])));
  }

  // A model line of a stage with challengers is named "stage/model metric"; the champion's
  // (the model whose predictions the stage publishes) says so.
  label(name) {
    const model = this.chart === "model" && name.match(/^([^/ ]+)\/([^ ]+) /);
    return model && (history.champions[model[1]] || []).includes(model[2])
      ? `${name} (champion)` : name;
  }

  build(labels, data) {
    if (this.plot) this.plot.destroy();
    this.names = labels.join("\n");
    const { format, unit, fromZero, spanGaps } = this.options;
    const show = value => (value === null || value === undefined ? "–" : format(value) + unit);
    const axis = { stroke: "#8a96a3", grid: { stroke: "#26313c", width: 1 },
                   ticks: { stroke: "#26313c", width: 1 } };
    this.plot = new uPlot({
      width: this.width(),
      height: 170,
      scales: fromZero ? { y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] } } : {},
      series: [
        { label: "time", value: (u, t) => (t === null ? "latest" : clock(t)) },
        ...labels.map((label, index) => ({
          label,
          stroke: COLORS[index % COLORS.length],
          width: 1.5,
          spanGaps: Boolean(spanGaps),
          points: { show: false },
          // At rest the legend shows each series' latest value, under the cursor the hovered one.
          value: (u, value, seriesIndex, index) =>
            show(index === null ? last(u.data[seriesIndex]) : value),
        })),
      ],
      axes: [{ ...axis, values: (u, splits) => splits.map(clock) },
             { ...axis, size: 60, values: (u, splits) => splits.map(format) }],
      legend: { live: true },
    }, data, this.element);
  }

  width() {
    return Math.max(this.element.clientWidth, 200);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: 170 });
  }
}

const plots = Object.keys(CHARTS).map(chart => new Plot(chart));
window.addEventListener("resize", () => plots.forEach(plot => plot.resize()));

// --- pipeline graph ----------------------------------------------------------------------

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function box(x, y, label, rateText, stroke, { dashed = false, muted = false } = {}) {
  const group = svg("g", { class: "node" });
  group.append(
    svg("rect", { x: x - 66, y: y - 20, width: 132, height: 40, rx: 6, fill: "#22303c", stroke,
                  "stroke-width": 2, ...(dashed ? { "stroke-dasharray": "5 3" } : {}) }),
    svg("text", { x, y: y - 4 }, label),
    svg("text", { x, y: y + 12, class: muted ? "rate ended" : "rate" }, rateText),
  );
  return group;
}

function rateText(rate) {
  return rate === null ? "" : `${compact(rate)} /s`;
}

function drawGraph(status) {
  const graph = document.getElementById("graph");
  const nodes = status.nodes || [];
  const width = graph.clientWidth || 900, height = 240, flowHeight = 176;
  const columns = ["source", "processor", "model", "sink"]
    .map(kind => nodes.filter(n => n.kind === kind)).filter(column => column.length);
  const position = {};
  const columnX = i => 80 + i * (width - 160) / Math.max(columns.length - 1, 1);
  columns.forEach((column, i) => column.forEach((node, j) => {
    position[node.name] = [columnX(i), (j + 1) * flowHeight / (column.length + 1)];
  }));
  const deadLetterTopics = [...new Set(nodes.map(n => n.dead_letter).filter(Boolean))];
  deadLetterTopics.forEach((topic, i) => {
    position[`dlq:${topic}`] = [(i + 1) * width / (deadLetterTopics.length + 1), height - 24];
  });
  const edges = [], labels = [], boxes = [];
  const topics = [...new Set(nodes.flatMap(n => [...(n.input || []), ...(n.output || [])]))];
  for (const topic of topics) {
    for (const producer of nodes.filter(n => (n.output || []).includes(topic))) {
      for (const consumer of nodes.filter(n => (n.input || []).includes(topic))) {
        const [x1, y1] = position[producer.name], [x2, y2] = position[consumer.name];
        edges.push(svg("line", { x1, y1, x2, y2, stroke: "#3b4a58", "stroke-width": 2 }));
        labels.push(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "topic" }, topic));
      }
    }
  }
  for (const node of nodes) {
    const [x, y] = position[node.name];
    if ((history.totals[node.name] || {}).dead_lettered > 0) {
      const [x2, y2] = position[`dlq:${node.dead_letter}`];
      edges.push(svg("line", { x1: x, y1: y, x2, y2, stroke: DEAD_LETTER_COLOR, "stroke-width": 1.5,
                               "stroke-dasharray": "4 4", opacity: 0.7 }));
    }
    const state = node.state || (node.running ? "running" : "failed");
    const text = state === "running" ? rateText(recent("throughput", node.name)) : state;
    const group = box(x, y, `${node.name} (${node.kind})`, text, STATE_COLORS[state] || "#3b4a58",
                      { dashed: state === "finished", muted: state !== "running" });
    group.dataset.name = node.name;
    group.dataset.state = state;
    boxes.push(group);
  }
  for (const topic of deadLetterTopics) {
    const feeding = nodes.filter(n => n.dead_letter === topic);
    const rates = feeding.map(n => recent("dead_letters", n.name)).filter(r => r !== null);
    const [x, y] = position[`dlq:${topic}`];
    const group = box(x, y, topic,
                      rateText(rates.length ? rates.reduce((a, b) => a + b, 0) : null),
                      DEAD_LETTER_COLOR, { dashed: true });
    group.classList.add("dead-letter-topic");
    group.dataset.name = topic;
    boxes.push(group);
  }
  graph.replaceChildren(...edges, ...labels, ...boxes);
}

// --- tables ------------------------------------------------------------------------------

function row(cells, header = false) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(header ? "th" : "td");
    if (cell instanceof Node) td.append(cell); else td.textContent = cell;
    tr.append(td);
  }
  return tr;
}

function renderTotals(status) {
  const rows = [row(["component", "in", "out", "filtered", "dead letters"], true)];
  for (const node of status.nodes || []) {
    const totals = history.totals[node.name];
    const number = field => (totals ? wholeFormat.format(totals[field]) : "–");
    const name = document.createElement("span"), kind = document.createElement("small");
    name.textContent = `${node.name} `;
    kind.textContent = node.kind;
    name.append(kind);
    const tr = row([name, number("records_in"), number("records_out"),
                    node.kind === "source" ? "" : number("filtered"), number("dead_lettered")]);
    tr.dataset.name = node.name;
    tr.dataset.kind = node.kind;
    rows.push(tr);
  }
  document.getElementById("totals").replaceChildren(...rows);
}

function renderSchedules(status) {
  const schedules = status.schedules || [];
  document.getElementById("schedules-panel").hidden = !schedules.length;
  const time = iso => (iso ? new Date(iso).toLocaleString() : "–");
  const rows = [row(["schedule", "cron", "runs", "failures", "skipped", "last start",
                     "last run", "next tick"], true)];
  for (const s of schedules) {
    const last = s.running ? "running" : s.last_error ? `failed: ${s.last_error}`
      : s.last_seconds === null ? "–" : `${s.last_seconds.toFixed(1)} s`;
    const tr = row([s.name, s.cron, wholeFormat.format(s.runs), wholeFormat.format(s.failures),
                    wholeFormat.format(s.skipped), time(s.last_start), last, time(s.next_tick)]);
    tr.dataset.name = s.name;
    rows.push(tr);
  }
  document.getElementById("schedules").replaceChildren(...rows);
}

let lastLetter = 0;
const LETTER_ROWS = 50;

function letterRow(letter) {
  const headers = Object.fromEntries(letter.headers);
  const from = [headers["streamflow.stage"], headers["streamflow.step"]].filter(Boolean).join(" / ");
  const error = document.createElement("span");
  error.className = "error";
  error.textContent = [headers["streamflow.error.class"], headers["streamflow.error.message"]]
    .filter(Boolean).join(": ");
  const value = document.createElement("div");
  value.className = "value";
  value.textContent = letter.value + (letter.truncated ? ` … (${wholeFormat.format(letter.size)} bytes)` : "");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = `${letter.headers.length} headers`;
  const list = document.createElement("dl");
  for (const [name, text] of letter.headers) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = text;
    list.append(dt, dd);
  }
  details.append(summary, list);
  const cell = document.createElement("div");
  cell.append(value, details);
  const tr = row([new Date(letter.time * 1000).toLocaleTimeString(), from || letter.topic, error,
                  letter.key === null ? "" : letter.key, cell]);
  tr.children[3].className = "key";
  tr.dataset.number = String(letter.number);
  return tr;
}

function renderDeadLetters(doc) {
  const body = document.querySelector("#dead-letters tbody");
  if (doc.count < lastLetter) {  // the daemon restarted: fetch them all at the next poll
    body.replaceChildren();
    lastLetter = 0;
    return;
  }
  if (doc.letters.length) {
    body.prepend(...doc.letters.map(letterRow));  // newest first
    while (body.children.length > LETTER_ROWS) body.lastElementChild.remove();
  }
  lastLetter = doc.count;
  document.getElementById("dead-letter-count").textContent =
    doc.count ? `the newest ${body.children.length} of ${wholeFormat.format(doc.count)} since start`
              : "none so far";
}

// --- polling -----------------------------------------------------------------------------

async function json(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function poll() {
  try {
    const after = history.t.length ? history.t[history.t.length - 1] : 0;
    const [status, doc, letters] = await Promise.all([
      json("/api/status"),
      json(`/api/history?after=${after}`),
      json(`/api/dead-letters?after=${lastLetter}`),
    ]);
    merge(doc);
    document.getElementById("pipeline").textContent = status.pipeline || "";
    const badge = document.getElementById("ready");
    badge.textContent = status.ready ? "ready" : "not ready";
    badge.className = "badge " + (status.ready ? "ok" : "bad");
    plots.forEach(plot => plot.update());
    drawGraph(status);
    renderTotals(status);
    renderSchedules(status);
    renderDeadLetters(letters);
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    const badge = document.getElementById("ready");
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

async function run() {  // one poll at a time, the next two seconds after the last
  await poll();
  setTimeout(run, POLL_MS);
}

run();
