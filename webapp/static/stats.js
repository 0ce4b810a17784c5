"use strict";

const form = document.getElementById("ask-form");
const errorBox = document.getElementById("error");
const answerBox = document.getElementById("answer");

// The colours of grounding/chart.py (the PNG of `ask --plot`): observed values, projections.
const ACCENT = "#1a5fb4";
const PROJECTED = "#8fb3e0";
const drawn = [];  // the Chart.js charts on the page, destroyed before the next answer draws its own

function cell(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? value.toLocaleString("en-US", {maximumFractionDigits: 3}) : String(value);
}

function renderTable(numbered) {
  const t = numbered.table;
  const unit = t.unit ? ` (${t.unit})` : "";
  const source = t.source ? `, according to ${t.source.name}` : "";
  const table = el("table", {"data-testid": "table"},
    el("caption", {text: `Table ${numbered.number}: ${t.title}${unit}${source}`}));
  table.append(el("thead", {}, el("tr", {}, ...t.columns.map((c) => el("th", {text: c})))));
  table.append(el("tbody", {}, ...t.rows.map((row) => el("tr", {}, ...row.map((v) => el("td", {text: cell(v)}))))));
  return table;
}

// A refusal by the safety guard: which check refused (the question, or the answer it would have shown) and
// why: every policy's probability of a violation against the threshold, the flagged ones marked.
function renderGuard(report) {
  const box = document.getElementById("guard");
  box.hidden = !(report && report.refused);
  if (box.hidden) return;
  const result = report.refused === "answer" ? report.answer : report.question;
  document.getElementById("guard-summary").textContent =
    `The safety guard (${result.model}) refused the ${report.refused}: a policy scored at or above the threshold ${result.threshold}.`;
  const rows = Object.entries(result.scores).map(([policy, p]) => {
    const flagged = result.flagged_policies.includes(policy);
    return el("tr", {"data-testid": "guard-score", class: flagged ? "flagged" : ""},
      el("td", {text: policy}), el("td", {text: p.toFixed(3)}), el("td", {text: flagged ? "flagged" : "passed"}));
  });
  document.getElementById("guard-scores").replaceChildren(
    el("caption", {text: `P(violation) per policy, ${report.refused === "answer" ? "answer" : "question"} check`}),
    el("thead", {}, el("tr", {}, el("th", {text: "policy"}), el("th", {text: "P(violation)"}), el("th", {text: "verdict"}))),
    el("tbody", {}, ...rows));
}

// Light bars with dark diagonal lines: the hatching of projected values.
function hatch() {
  const tile = document.createElement("canvas");
  tile.width = tile.height = 8;
  const ctx = tile.getContext("2d");
  ctx.fillStyle = PROJECTED;
  ctx.fillRect(0, 0, 8, 8);
  ctx.strokeStyle = ACCENT;
  ctx.beginPath();
  ctx.moveTo(0, 8); ctx.lineTo(8, 0);
  ctx.stroke();
  return ctx.createPattern(tile, "repeat");
}

// A Chart.js configuration for a chart description of the API (grounding.chart.Chart).
function chartConfig(chart) {
  const projection = chart.points.map((p) => p.projection);
  const labels = chart.points.map((p) => p.label);
  const values = chart.points.map((p) => p.value);
  const unit = chart.unit ? ` ${chart.unit}` : "";
  const tooltip = {callbacks: {label: (ctx) => `${cell(values[ctx.dataIndex])}${unit}`
                                             + (projection[ctx.dataIndex] ? " (projection)" : "")}};
  const options = {animation: false, responsive: true, maintainAspectRatio: false,
                   plugins: {legend: {display: false}, tooltip}};
  const valueAxis = {title: {display: true, text: chart.y_label}};
  const categoryAxis = {title: {display: true, text: chart.x_label}};
  if (chart.kind === "line") {
    const numeric = chart.points.every((p) => p.x !== null);
    const dataset = {
      label: chart.y_label, borderColor: ACCENT, backgroundColor: ACCENT, borderWidth: 2, pointRadius: 3,
      pointBackgroundColor: projection.map((p) => (p ? "#fff" : ACCENT)),
      data: numeric ? chart.points.map((p) => ({x: p.x, y: p.value})) : values,
      segment: {borderDash: (ctx) => (projection[ctx.p1DataIndex] ? [6, 4] : undefined)},
    };
    const x = numeric
      ? {...categoryAxis, type: "linear", ticks: {precision: 0, callback: (v) => (Number.isInteger(v) ? String(v) : "")}}
      : categoryAxis;
    return {type: "line", data: {labels: numeric ? undefined : labels, datasets: [dataset]},
            options: {...options, scales: {x, y: valueAxis}}};
  }
  const pattern = hatch();
  const dataset = {label: chart.y_label, data: values, borderColor: ACCENT, borderWidth: 1,
                   backgroundColor: projection.map((p) => (p ? pattern : ACCENT))};
  const across = chart.horizontal;  // rankings: bars across, first rank at the top
  const scales = {[across ? "x" : "y"]: {...valueAxis, beginAtZero: true},
                  [across ? "y" : "x"]: {...categoryAxis, ticks: {autoSkip: false}}};
  return {type: "bar", data: {labels, datasets: [dataset]}, options: {...options, indexAxis: across ? "y" : "x", scales}};
}

function renderChart(chart, container) {
  const kind = chart.kind === "line" ? "line chart" : "bar chart";
  const canvas = el("canvas", {role: "img", "aria-label": `${chart.title}: ${kind} of ${chart.y_label}`,
                               "data-testid": "chart-canvas"});
  const box = el("div", {class: "chart-box"}, canvas);
  if (chart.horizontal) box.style.height = `${Math.max(240, 70 + 22 * chart.points.length)}px`;
  container.append(el("figure", {class: "chart", "data-testid": "chart", "data-kind": chart.kind},
    el("figcaption", {text: chart.title}), box,
    el("div", {class: "chart-footer", "data-testid": "chart-footer"}, ...chart.footer.map((line) => el("p", {text: line})))));
  drawn.push(new Chart(canvas, chartConfig(chart)));  // once in the page: it sizes itself to its box
}

function abstention(answer) {
  if (!answer.no_answer || (answer.guard && answer.guard.refused)) return "";  // a refusal explains itself
  if (answer.model && answer.mode === "rig") return "No number in this answer could be checked against the statistics.";
  const resolution = answer.resolution || {};
  const reason = resolution.problem
    || (resolution.missing_date && `no value for ${resolution.missing_date} (the nearest years are below, not substituted)`)
    || "the source has no data for this question";
  return `No answer from the statistics: ${reason}.`;
}

function renderAnswer(answer) {
  const noAnswer = abstention(answer);
  const abstentionBox = document.getElementById("abstention");
  abstentionBox.textContent = noAnswer;
  abstentionBox.hidden = !noAnswer;
  document.getElementById("answer-text").textContent = answer.text;
  renderGuard(answer.guard);
  document.getElementById("footnotes").replaceChildren(...answer.footnotes.map((f) => el("li", {text: f})));
  const notes = [];
  if (answer.fallback) notes.push("The tables could not answer; this answer is the model's own, not grounded.");
  if (answer.invalid_citations.length) notes.push(`Cites tables that do not exist: ${answer.invalid_citations.join(", ")}`);
  for (const [query, error] of Object.entries(answer.errors)) notes.push(`Lookup failed for “${query}”: ${error}`);
  document.getElementById("notes").replaceChildren(...notes.map((n) => el("li", {text: n})));
  const explained = Object.entries(answer.explanations || {});
  document.getElementById("resolution").replaceChildren(...explained.map(([query, text]) =>
    el("li", {text: explained.length === 1 && query === answer.question ? text : `“${query}”: ${text}`})));
  document.getElementById("resolution-box").hidden = !explained.length;
  const attribution = document.getElementById("attribution");
  attribution.textContent = answer.attribution.join(" · ");
  attribution.hidden = !answer.attribution.length;
  const used = answer.tables.filter((t) => !answer.citations.length || answer.citations.includes(t.number));
  document.getElementById("tables").replaceChildren(...used.map(renderTable));
  while (drawn.length) drawn.pop().destroy();
  const charts = document.getElementById("charts");
  charts.replaceChildren();
  answerBox.hidden = false;  // before drawing: a chart takes the size of its box
  for (const chart of answer.charts || []) renderChart(chart, charts);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button");
  button.disabled = true;
  answerBox.setAttribute("aria-busy", "true");
  showError(errorBox, null);
  try {
    renderAnswer(await postJSON("/api/ask", {question: form.question.value, mode: form.mode.value}));
  } catch (error) {
    answerBox.hidden = true;
    showError(errorBox, error);
  } finally {
    button.disabled = false;
    answerBox.setAttribute("aria-busy", "false");
    // How many questions this page has answered (or failed): a script or test waits on it changing.
    answerBox.dataset.answered = String(Number(answerBox.dataset.answered || 0) + 1);
  }
});

fetch("/api/status").then((r) => r.json()).then((status) => {
  document.getElementById("status").textContent =
    `Statistics from the ${status.statistics_source} source` + (status.llm ? `, answers by ${status.llm}` : ", stated plainly (no model)")
    + (status.guard ? `; screened by the safety guard ${status.guard}` : "");
}).catch(() => {});
