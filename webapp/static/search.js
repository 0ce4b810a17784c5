"use strict";

const form = document.getElementById("search-form");
const results = document.getElementById("results");
const overlay = document.getElementById("overlay");
const errorBox = document.getElementById("error");
const summary = document.getElementById("summary");
const statusLine = document.getElementById("status");

// Similarity maps are computed on demand: load an overlay only when the toggle is on.
function applyOverlay() {
  for (const img of results.querySelectorAll("img.simmap")) {
    if (overlay.checked && !img.getAttribute("src")) img.setAttribute("src", img.dataset.src);
    img.hidden = !overlay.checked;
  }
}

function renderHit(hit) {
  const page = el("a", {class: "page", href: hit.image_url, target: "_blank", rel: "noopener"},
    el("img", {src: hit.thumbnail_url, alt: `page ${hit.page_number} of ${hit.document_name}`, loading: "lazy",
               "data-testid": "thumbnail"}),
    el("img", {class: "simmap", "data-src": hit.simmap_url, alt: "", hidden: "", "data-testid": "simmap"}));
  return el("li", {class: "hit", "data-testid": "hit", "data-page-id": String(hit.page_id)},
    page,
    el("h3", {text: `${hit.rank}. ${hit.document_name} · page ${hit.page_number}`}),
    el("div", {class: "score", "data-testid": "score",
               text: `score ${hit.score.toFixed(3)} · normalized ${hit.normalized_score.toFixed(3)}`}),
    el("p", {class: "snippet", text: hit.text}));
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button");
  button.disabled = true;
  showError(errorBox, null);
  try {
    const data = await postJSON("/api/search", {query: form.query.value, k: Number(form.k.value) || 5});
    results.replaceChildren(...data.hits.map(renderHit));
    summary.textContent = `${data.hits.length} of ${data.pages_in_index} pages, ${data.elapsed_ms} ms`;
    if (data.missing_shards && data.missing_shards.length) {
      summary.textContent += ` — incomplete: shard(s) ${data.missing_shards.join(", ")} of ${data.shards} did not ` +
        "answer, these results come from the others";
    }
    applyOverlay();
  } catch (error) {
    results.replaceChildren();
    summary.textContent = "";
    showError(errorBox, error);
  } finally {
    button.disabled = false;
  }
});

overlay.addEventListener("change", applyOverlay);

fetch("/api/status").then((r) => r.json()).then((status) => {
  statusLine.textContent = status.search_enabled
    ? `${status.pages_in_index} pages indexed with ${status.model_id}`
    : "No page index is configured: start the server with --index DIR.";
}).catch(() => { statusLine.textContent = "The server did not answer."; });
