"use strict";

const form = document.getElementById("ask-form");
const errorBox = document.getElementById("error");
const answerBox = document.getElementById("answer");

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

function renderAnswer(answer) {
  document.getElementById("answer-text").textContent = answer.text;
  renderGuard(answer.guard);
  document.getElementById("footnotes").replaceChildren(...answer.footnotes.map((f) => el("li", {text: f})));
  const notes = [];
  if (answer.fallback) notes.push("The tables could not answer; this answer is the model's own, not grounded.");
  if (answer.invalid_citations.length) notes.push(`Cites tables that do not exist: ${answer.invalid_citations.join(", ")}`);
  for (const [query, error] of Object.entries(answer.errors)) notes.push(`Lookup failed for “${query}”: ${error}`);
  document.getElementById("notes").replaceChildren(...notes.map((n) => el("li", {text: n})));
  const used = answer.tables.filter((t) => !answer.citations.length || answer.citations.includes(t.number));
  document.getElementById("tables").replaceChildren(...used.map(renderTable));
  answerBox.hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button");
  button.disabled = true;
  showError(errorBox, null);
  try {
    renderAnswer(await postJSON("/api/ask", {question: form.question.value, mode: form.mode.value}));
  } catch (error) {
    answerBox.hidden = true;
    showError(errorBox, error);
  } finally {
    button.disabled = false;
  }
});

fetch("/api/status").then((r) => r.json()).then((status) => {
  document.getElementById("status").textContent =
    `Statistics from the ${status.statistics_source} source` + (status.llm ? `, answers by ${status.llm}` : ", stated plainly (no model)")
    + (status.guard ? `; screened by the safety guard ${status.guard}` : "");
}).catch(() => {});
