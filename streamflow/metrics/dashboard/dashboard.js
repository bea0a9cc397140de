// The streamflow dashboard: polls /metrics and /api/status every two seconds and draws
// canvas charts and an SVG pipeline graph. No dependencies, nothing loaded from elsewhere.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150;
const COLORS = ["#4fb3ff", "#ffb84f", "#7ee081", "#ff6f91", "#c39bff", "#5ce1e6", "#f9f871"];

// --- Prometheus text format ----------------------------------------------------------------

function parseMetrics(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    if (match[3]) {
      for (const pair of match[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    }
    (samples[match[1]] = samples[match[1]] || []).push({ labels, value: parseFloat(match[4]) });
  }
  return samples;
}

function sumBy(samples, name, label) {
  const out = {};
  for (const s of samples[name] || []) {
    const key = s.labels[label];
    out[key] = (out[key] || 0) + s.value;
  }
  return out;
}

// Quantile of a histogram from bucket counts (cumulative, keyed by upper bound).
function quantile(buckets, q) {
  const bounds = Object.keys(buckets).map(Number).sort((a, b) => a - b);
  const total = buckets[Infinity] || 0;
  if (total <= 0) return null;
  let previousBound = 0, previousCount = 0;
  for (const bound of bounds) {
    const count = buckets[bound];
    if (count >= q * total) {
      if (!isFinite(bound)) return previousBound;
      const within = count - previousCount;
      const fraction = within > 0 ? (q * total - previousCount) / within : 0;
      return previousBound + (bound - previousBound) * fraction;
    }
    previousBound = bound; previousCount = count;
  }
  return previousBound;
}

function latencyBuckets(samples) {
  const buckets = {};
  for (const s of samples["streamflow_end_to_end_latency_seconds_bucket"] || []) {
    const bound = s.labels.le === "+Inf" ? Infinity : parseFloat(s.labels.le);
    buckets[bound] = (buckets[bound] || 0) + s.value;
  }
  return buckets;
}

// --- charts ------------------------------------------------------------------------------

class Chart {
  constructor(id, format) {
    this.canvas = document.getElementById(id);
    this.format = format || (v => v.toFixed(1));
    this.series = {};
  }

  push(values) {
    for (const [name, value] of Object.entries(values)) {
      if (value === null || !isFinite(value)) continue;
      (this.series[name] = this.series[name] || []).push(value);
      if (this.series[name].length > HISTORY) this.series[name].shift();
    }
    this.draw();
  }

  draw() {
    const canvas = this.canvas, ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    canvas.width = width * ratio; canvas.height = height * ratio;
    const g = canvas.getContext("2d");
    g.scale(ratio, ratio);
    g.clearRect(0, 0, width, height);
    const names = Object.keys(this.series).sort();
    const all = names.flatMap(n => this.series[n]);
    const max = Math.max(1e-9, ...all), min = Math.min(0, ...all);
    const legendRows = Math.max(1, Math.ceil(names.length / 3));
    const left = 56, top = 8, bottom = 10 + 12 * legendRows;
    const plotH = height - top - bottom, plotW = width - left - 8;
    g.strokeStyle = "#26313c"; g.fillStyle = "#8a96a3"; g.font = "11px system-ui";
    for (let i = 0; i <= 2; i++) {
      const y = top + plotH * i / 2, value = max - (max - min) * i / 2;
      g.beginPath(); g.moveTo(left, y); g.lineTo(width - 8, y); g.stroke();
      g.fillText(this.format(value), 4, y + 4);
    }
    let points = 0;
    names.forEach((name, index) => {
      const values = this.series[name], color = COLORS[index % COLORS.length];
      g.strokeStyle = color; g.lineWidth = 1.8; g.beginPath();
      values.forEach((v, i) => {
        const x = left + plotW * (i + HISTORY - values.length) / (HISTORY - 1);
        const y = top + plotH * (max - v) / (max - min || 1);
        if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
      });
      g.stroke();
      points += values.length;
      g.fillStyle = color;
      const column = index % 3, row = Math.floor(index / 3);
      g.fillText(`${name} ${this.format(values[values.length - 1])}`,
                 left + 6 + column * (plotW / 3), height - 6 - 12 * (legendRows - 1 - row));
    });
    canvas.dataset.points = String(points);
    canvas.dataset.last = JSON.stringify(
      Object.fromEntries(names.map(n => [n, this.series[n][this.series[n].length - 1]])));
  }
}

const charts = {
  throughput: new Chart("chart-throughput"),
  lag: new Chart("chart-lag", v => v.toFixed(0)),
  errors: new Chart("chart-errors", v => v.toFixed(2)),
  latency: new Chart("chart-latency", v => v.toFixed(3)),
  model: new Chart("chart-model", v => v.toFixed(3)),
};

// --- pipeline graph ----------------------------------------------------------------------

function drawGraph(status, rates) {
  const svg = document.getElementById("graph");
  const nodes = status.nodes || [];
  const topics = [...new Set(nodes.flatMap(n => [...(n.input || []), ...(n.output || [])]))];
  const columns = [
    nodes.filter(n => n.kind === "source"),
    nodes.filter(n => n.kind === "processor"),
    nodes.filter(n => n.kind === "model"),
    nodes.filter(n => n.kind === "sink"),
  ].filter(column => column.length);
  const width = svg.clientWidth || 900, height = 200, position = {};
  const columnX = i => 70 + i * (width - 140) / Math.max(columns.length - 1, 1);
  columns.forEach((column, i) => column.forEach((node, j) => {
    position[node.name] = [columnX(i), (j + 1) * height / (column.length + 1)];
  }));
  const edges = [];
  for (const topic of topics) {
    const producers = nodes.filter(n => (n.output || []).includes(topic));
    const consumers = nodes.filter(n => (n.input || []).includes(topic));
    for (const p of producers) for (const c of consumers) edges.push([p, c, topic]);
  }
  const parts = edges.map(([p, c, topic]) => {
    const [x1, y1] = position[p.name], [x2, y2] = position[c.name];
    return `<line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" stroke="#3b4a58" stroke-width="2"/>` +
      `<text x="${(x1 + x2) / 2}" y="${(y1 + y2) / 2 - 6}" fill="#8a96a3" font-size="11"
        text-anchor="middle">${topic}</text>`;
  });
  for (const node of nodes) {
    const [x, y] = position[node.name] || [0, 0];
    const rate = rates[node.name];
    const color = node.running ? "#1f7a3a" : "#9a2b2b";
    parts.push(`<g class="node" data-name="${node.name}">
      <rect x="${x - 62}" y="${y - 20}" width="124" height="40" rx="6" fill="#22303c"
        stroke="${color}" stroke-width="2"/>
      <text x="${x}" y="${y - 4}" fill="#e6e6e6" font-size="12" text-anchor="middle">${node.name}
        (${node.kind})</text>
      <text x="${x}" y="${y + 12}" fill="#4fb3ff" font-size="11" text-anchor="middle"
        class="rate">${rate === undefined ? "" : rate.toFixed(0) + " /s"}</text></g>`);
  }
  svg.innerHTML = parts.join("");
}

// --- polling -----------------------------------------------------------------------------

let previous = null;

function rate(now, before, dt) {
  const out = {};
  for (const key of Object.keys(now)) out[key] = Math.max(0, (now[key] - (before[key] || 0)) / dt);
  return out;
}

function renderTotals(samples) {
  const rows = [["stage", "in", "out", "filtered", "dead-lettered"]];
  const get = name => sumBy(samples, `streamflow_records_${name}_total`, "stage");
  const [inn, out, filtered, dead] = ["in", "out", "filtered", "dead_lettered"].map(get);
  for (const stage of Object.keys(inn).sort()) {
    rows.push([stage, inn[stage], out[stage] || 0, filtered[stage] || 0, dead[stage] || 0]);
  }
  document.getElementById("totals").innerHTML = rows.map((row, i) => "<tr>" +
    row.map(c => i ? `<td>${c}</td>` : `<th>${c}</th>`).join("") + "</tr>").join("");
}

async function poll() {
  try {
    const [metricsText, status] = await Promise.all([
      fetch("/metrics").then(r => r.text()),
      fetch("/api/status").then(r => r.json()),
    ]);
    const samples = parseMetrics(metricsText);
    const now = {
      time: performance.now() / 1000,
      out: sumBy(samples, "streamflow_records_out_total", "stage"),
      sourced: sumBy(samples, "streamflow_source_records_total", "source"),
      dead: sumBy(samples, "streamflow_records_dead_lettered_total", "stage"),
      buckets: latencyBuckets(samples),
    };
    document.getElementById("pipeline").textContent = status.pipeline || "";
    const badge = document.getElementById("ready");
    badge.textContent = status.ready ? "ready" : "not ready";
    badge.className = "badge " + (status.ready ? "ok" : "bad");
    const lag = sumBy(samples, "streamflow_consumer_lag_records", "stage");
    // One line per stage, metric and window: the mean over the stage's partitions.
    const modelSums = {}, modelCounts = {};
    for (const s of samples["streamflow_model_metric"] || []) {
      const name = `${s.labels.stage} ${s.labels.metric}` +
        (s.labels.window === "rolling" ? " (rolling)" : "");
      modelSums[name] = (modelSums[name] || 0) + s.value;
      modelCounts[name] = (modelCounts[name] || 0) + 1;
    }
    const model = Object.fromEntries(
      Object.keys(modelSums).map(name => [name, modelSums[name] / modelCounts[name]]));
    charts.lag.push(lag);
    charts.model.push(model);
    if (previous) {
      const dt = Math.max(now.time - previous.time, 0.001);
      const throughput = rate(now.out, previous.out, dt);
      const sourced = rate(now.sourced, previous.sourced, dt);
      charts.throughput.push(throughput);
      charts.errors.push(rate(now.dead, previous.dead, dt));
      const interval = {};
      for (const bound of Object.keys(now.buckets)) {
        interval[bound] = now.buckets[bound] - (previous.buckets[bound] || 0);
      }
      const recent = interval[Infinity] > 0 ? interval : now.buckets;
      charts.latency.push({ p50: quantile(recent, 0.5), p95: quantile(recent, 0.95) });
      drawGraph(status, { ...throughput, ...sourced });
    } else {
      drawGraph(status, {});
    }
    renderTotals(samples);
    previous = now;
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("ready").textContent = "unreachable";
    document.getElementById("ready").className = "badge bad";
  }
}

poll();
setInterval(poll, POLL_MS);
