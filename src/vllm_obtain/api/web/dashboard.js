// Dashboard: the models and what they are doing (/admin/models, /health), tokens per second
// from /metrics' counter, sampled from the moment the page opens, and what `doctor` reports.

import { getJson, call } from "./api.js";
import { $ } from "./dom.js";

const POLL_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000; // the chart's span
const GENERATED = "vllm_obtain_generation_tokens_total";

/** The tokens generated so far, every model together, from Prometheus' text format. */
export function generatedTokens(metricsText) {
  let total = 0;
  for (const line of metricsText.split("\n")) {
    if (line.startsWith(GENERATED) && (line[GENERATED.length] === "{" || line[GENERATED.length] === " ")) {
      total += Number(line.slice(line.lastIndexOf(" ") + 1)) || 0;
    }
  }
  return total;
}

function bytes(count) {
  if (!count) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function cell(text, field) {
  const td = document.createElement("td");
  td.textContent = text;
  if (field) td.dataset.field = field;
  return td;
}

function modelRows(models, health) {
  const running = Object.fromEntries((health.models ?? []).map((m) => [m.id, m]));
  const rows = models.map((model) => {
    const live = running[model.id] ?? {};
    const state =
      model.engine_state && model.engine_state !== "ready" ? `${model.state} (${model.engine_state})` : model.state;
    return { id: model.id, state, engine: model.engine, memory: model.memory_bytes, live };
  });
  for (const embedder of health.embedding_models ?? []) {
    rows.push({ id: embedder.id, state: embedder.state, engine: `${embedder.engine} (embeddings)`, memory: embedder.memory_bytes, live: embedder });
  }
  return rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.model = row.id;
    tr.append(
      cell(row.id),
      cell(row.state, "state"),
      cell(row.engine, "engine"),
      cell(bytes(row.memory), "memory"),
      cell(String(row.live.running ?? 0), "running"),
      cell(String(row.live.waiting ?? 0), "waiting"),
    );
    return tr;
  });
}

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

/** Tokens/s between samples as an SVG line: the last five minutes, or since the page opened
 * (a minute at least). */
function drawChart(chart, rates, now) {
  const span = Math.min(WINDOW_MS, Math.max(60_000, now - (rates[0]?.t ?? now)));
  const spanText = span >= WINDOW_MS ? "5 min ago" : `${Math.round(span / 1000)} s ago`;
  const width = 600;
  const height = 160;
  const left = 40;
  const bottom = 20;
  const top = Math.max(1, ...rates.map((r) => r.rate));
  const x = (t) => left + ((t - (now - span)) / span) * (width - left);
  const y = (rate) => height - bottom - (rate / top) * (height - bottom - 10);
  const points = rates.map((r) => `${x(r.t).toFixed(1)},${y(r.rate).toFixed(1)}`).join(" ");
  chart.replaceChildren(
    svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }),
    svg("text", { x: left - 4, y: y(top) + 4, "text-anchor": "end", class: "label" }, top.toFixed(0)),
    svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end", class: "label" }, "0"),
    svg("text", { x: left, y: height - 4, class: "label" }, spanText),
    svg("text", { x: width, y: height - 4, "text-anchor": "end", class: "label" }, "now"),
    svg("polyline", { points, class: "rate" }),
  );
}

function showSystem(report) {
  const entries = [
    ["System", `${report.system} ${report.machine}, ${report.cpu_count} CPUs, ${report.memory_gib ? report.memory_gib.toFixed(1) + " GiB" : "unknown"} memory`],
    ["CPU", report.cpu_features.join(" ") || "–"],
    ["GPUs", report.gpus.join(", ") || "none"],
    ["Engines", Object.entries(report.engines).map(([name, installed]) => `${name}: ${installed ? "installed" : "–"}`).join(", ")],
    ["llama.cpp GPU offload", report.llama_cpp_gpu_offload === null ? "not installed" : report.llama_cpp_gpu_offload ? "yes" : "no (a CPU-only build)"],
    ["Ray Serve", report.ray_serve ?? "not installed"],
    ...report.choices.map((c) => [c.model, c.engine ? `${c.engine}: ${c.why}` : c.why]),
  ];
  if (report.warning) entries.push(["Warning", report.warning]);
  $("system").replaceChildren(
    ...entries.flatMap(([term, description]) => [
      Object.assign(document.createElement("dt"), { textContent: term }),
      Object.assign(document.createElement("dd"), { textContent: description }),
    ]),
  );
}

const metric = (name) => document.querySelector(`[data-metric="${name}"]`);

export function setUpDashboard() {
  const samples = []; // {t, total}: the generated-tokens counter as sampled
  const error = $("dashboard-error");

  function rates() {
    // From the first sample on, at rest: one rate measured is already a line.
    const found = samples.length > 1 ? [{ t: samples[0].t, rate: 0 }] : [];
    for (let i = 1; i < samples.length; i += 1) {
      const seconds = (samples[i].t - samples[i - 1].t) / 1000;
      found.push({ t: samples[i].t, rate: Math.max(0, samples[i].total - samples[i - 1].total) / seconds });
    }
    return found;
  }

  function lastMinuteRate(now) {
    const last = samples.at(-1);
    const first = samples.find((s) => s.t >= now - 60_000) ?? samples[0];
    const seconds = (last.t - first.t) / 1000;
    return seconds > 0 ? (last.total - first.total) / seconds : 0;
  }

  async function showModels() {
    const [models, health] = await Promise.all([
      getJson("admin/models"),
      getJson("health", { allow: [503] }), // 503 still says each model's state
    ]);
    $("model-rows").replaceChildren(...modelRows(models.data, health));
  }

  async function sampleTokens() {
    const now = Date.now();
    samples.push({ t: now, total: generatedTokens(await (await call("metrics")).text()) });
    while (samples.length > 2 && samples[0].t < now - WINDOW_MS) samples.shift();
    const series = rates();
    drawChart($("rate-chart"), series, now);
    metric("tokens-per-second-now").textContent = (series.at(-1)?.rate ?? 0).toFixed(1);
    metric("tokens-per-second").textContent = lastMinuteRate(now).toFixed(1);
    metric("tokens-total").textContent = String(samples.at(-1).total);
  }

  /** Tokens are sampled from the page's opening (for the rate), models while in view. */
  async function poll() {
    if (document.hidden) return; // a tab in the background asks nothing
    const inView = !$("view-dashboard").hidden;
    const results = await Promise.allSettled([sampleTokens(), inView ? showModels() : null]);
    const failed = results.find((r) => r.status === "rejected");
    error.hidden = !failed;
    if (failed) error.textContent = failed.reason.message;
  }

  getJson("admin/system").then(showSystem, (e) => {
    $("system").textContent = e.message;
  });
  const tick = () => poll().finally(() => setTimeout(tick, POLL_MS));
  tick();
  // Shown at once when opened, not at the next tick.
  $("tab-dashboard").addEventListener("click", () => showModels().catch(() => {}));
}
