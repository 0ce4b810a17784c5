"""The web app end to end in a real browser: Debian's chromium driven by Playwright against a real uvicorn
server on 127.0.0.1 (a free port) serving a tiny page index and the embedded statistics store.

Screenshots are saved under ``test-artifacts/`` at the repository root (gitignored).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gapminder_truth import gapminder
from webapp_support import MARKUP_LINE, MARKUP_TITLE, tiny_index

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]




def _start(app):
    """The app on a real uvicorn server on 127.0.0.1 (a free port), with the web app's own HTTP protocol."""
    from grounding.asgi import BackgroundServer
    from webapp import http_protocol

    return BackgroundServer(app, "127.0.0.1", 0, protocol=http_protocol(), name="webapp")


@pytest.fixture(scope="module")
def server_url():
    from webapp import create_app

    index_dir, _ = tiny_index()
    running = _start(create_app(index_dir))
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


MODEL_MARKUP = '<img src=x onerror="alert(2)"> rose [Table 1]'


@pytest.fixture(scope="module")
def model_server_url():
    """The statistics page with a (scripted) answering model whose text is markup."""
    import itertools

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from webapp import create_app

    script = itertools.cycle([AIMessage("What is life expectancy in Japan?"), AIMessage(MODEL_MARKUP)])
    running = _start(create_app(llm=GenericFakeChatModel(messages=script)))
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def page(server_url):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium; run `make test` (which "
                    "installs it) or `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(30_000)
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))  # an alert() would mean injected script
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        blocked: list[str] = []  # what the Content-Security-Policy refused (an inline style, a CDN script ...)
        tab.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
        tab.dialogs, tab.script_errors, tab.csp_violations = dialogs, errors, blocked
        yield tab
        browser.close()


def loaded(image) -> bool:
    return image.evaluate("img => img.complete && img.naturalWidth > 0")


def test_model_text_is_shown_as_text(page, model_server_url):
    page.goto(model_server_url + "/stats")
    page.get_by_test_id("question").fill("How has life expectancy changed in Japan?")
    page.get_by_test_id("ask").click()
    page.get_by_test_id("table").wait_for()
    assert page.get_by_test_id("answer-text").inner_text() == MODEL_MARKUP
    assert page.locator("#answer img").count() == 0
    # The model wrote the text; the table it cites still comes with its chart, how its lookup resolved and
    # the source's attribution line.
    assert page.get_by_test_id("resolution").inner_text().startswith(
        "“What is life expectancy in Japan?”: resolved to: Life expectancy (1.00) for Japan")
    assert page.get_by_test_id("attribution").inner_text().startswith("Data: Gapminder")
    (chart,) = _charts(page)
    assert chart["values"] == [gapminder("Japan", year, "lifeExp") for year in range(1952, 2008, 5)]
    page.screenshot(path=str(ARTIFACTS / "stats-model-markup.png"), full_page=True)
    assert page.dialogs == [] and page.script_errors == [] and page.csp_violations == []


def test_search_results_thumbnails_and_similarity_overlay(page, server_url):
    page.goto(server_url + "/")
    page.get_by_test_id("status").filter(has_text="6 pages indexed").wait_for()
    page.get_by_test_id("query").fill("total due on the invoice")
    page.get_by_test_id("k").fill("6")
    page.get_by_test_id("search").click()
    hits = page.get_by_test_id("hit")
    hits.nth(5).wait_for()
    assert hits.count() == 6
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=thumbnail]')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    scores = [float(t.split()[1]) for t in page.get_by_test_id("score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    # Overlays are off, then on (loaded on demand, laid exactly over each page image).
    maps = page.get_by_test_id("simmap")
    assert all(not m.is_visible() for m in maps.all())
    page.screenshot(path=str(ARTIFACTS / "search-results.png"), full_page=True)
    page.get_by_test_id("overlay-toggle").check()
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=simmap]')]"
                           ".every(img => !img.hidden && img.complete && img.naturalWidth > 0)")
    first = hits.first
    assert first.get_by_test_id("simmap").bounding_box() == first.get_by_test_id("thumbnail").bounding_box()
    page.screenshot(path=str(ARTIFACTS / "search-overlay.png"), full_page=True)
    page.get_by_test_id("overlay-toggle").uncheck()
    assert all(not m.is_visible() for m in maps.all())
    # Text from the index is shown as text: the markup page's title and text appear literally, nothing runs.
    markup = hits.filter(has_text="markup.pdf")
    assert MARKUP_TITLE in markup.inner_text() and MARKUP_LINE in markup.inner_text()
    assert page.locator("#results script, #results b, #results img[src='x']").count() == 0
    assert page.dialogs == [] and page.script_errors == []


def test_search_errors_are_shown(page, server_url):
    page.goto(server_url + "/")
    page.get_by_test_id("query").fill("    ")
    page.get_by_test_id("search").click()
    error = page.get_by_test_id("error")
    error.wait_for()
    assert "blank" in error.inner_text() and page.get_by_test_id("hit").count() == 0


def _table_number(value: float) -> str:
    """How the page formats numbers (toLocaleString en-US, at most 3 decimals)."""
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def test_statistics_answers_with_footnotes_and_tables(page, server_url):
    page.goto(server_url + "/stats")
    page.get_by_test_id("question").fill("What was the life expectancy in Kenya in 2007?")
    page.get_by_test_id("mode").select_option("rig")
    page.get_by_test_id("ask").click()
    text = page.get_by_test_id("answer-text")
    text.filter(has_text="Kenya").wait_for()
    assert f"{gapminder('Kenya', 2007, 'lifeExp'):.2f} years" in text.inner_text()
    assert page.get_by_test_id("footnotes").inner_text().startswith("[1] - Per Gapminder")
    page.screenshot(path=str(ARTIFACTS / "stats-rig.png"), full_page=True)

    page.get_by_test_id("question").fill("How has life expectancy changed in Japan?")
    page.get_by_test_id("mode").select_option("rag")
    page.get_by_test_id("ask").click()
    table = page.get_by_test_id("table")
    table.wait_for()
    assert "[Table 1]" in text.inner_text()
    assert table.locator("caption").inner_text().startswith("Table 1: Life expectancy in Japan")
    cells = {row[0]: row[-1] for row in (r.split("\t") for r in table.locator("tbody tr").all_inner_texts())}
    assert cells["2007"] == _table_number(gapminder("Japan", 2007, "lifeExp"))
    assert cells["1952"] == _table_number(gapminder("Japan", 1952, "lifeExp"))
    page.screenshot(path=str(ARTIFACTS / "stats-rag.png"), full_page=True)
    assert page.dialogs == [] and page.script_errors == []


@pytest.fixture(scope="module")
def guarded_server_url():
    """The statistics page behind a safety guard that flags every question (threshold 0)."""
    from guard_support import tiny_guard, with_threshold

    from webapp import create_app

    running = _start(create_app(guard=with_threshold(tiny_guard(), 0.0)))
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


def test_statistics_page_shows_a_refusal_and_why(page, guarded_server_url):
    from guard_support import tiny_guard

    question = "What was the life expectancy in Kenya in 2007?"
    page.goto(guarded_server_url + "/stats")
    page.get_by_test_id("status").filter(has_text="screened by the safety guard").wait_for()
    page.get_by_test_id("question").fill(question)
    page.get_by_test_id("ask").click()
    page.get_by_test_id("guard").wait_for()
    assert page.get_by_test_id("answer-text").inner_text().startswith(
        "Refused: the safety guard (tiny-shieldgemma) flagged this question for ")
    assert "refused the question" in page.get_by_test_id("guard-summary").inner_text()
    rows = [r.split("\t") for r in page.get_by_test_id("guard-score").all_inner_texts()]
    expected = tiny_guard().probabilities(question)
    assert rows == [[name, f"{p:.3f}", "flagged"] for name, p in expected.items()]
    assert page.get_by_test_id("table").count() == 0 and page.get_by_test_id("footnotes").inner_text() == ""
    page.screenshot(path=str(ARTIFACTS / "stats-guard-refusal.png"), full_page=True)
    assert page.dialogs == [] and page.script_errors == []

# What Chart.js drew on each chart of the page: its data and axis titles (its public API), and the canvas
# pixels at each point or in the middle of each bar (the colour there, as drawn).
CHARTS_DRAWN = """() => [...document.querySelectorAll('[data-testid=chart-canvas]')].map((canvas) => {
  const chart = Chart.getChart(canvas), meta = chart.getDatasetMeta(0), ratio = window.devicePixelRatio;
  const image = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const pixel = (x, y) => { const i = 4 * (Math.round(y * ratio) * canvas.width + Math.round(x * ratio));
                            return Array.from(image.slice(i, i + 3)); };
  const across = chart.options.indexAxis === 'y';
  const centre = (e) => chart.config.type === 'line' ? [e.x, e.y] : across ? [(e.x + e.base) / 2, e.y] : [e.x, (e.y + e.base) / 2];
  let painted = 0;
  for (let i = 3; i < image.length; i += 4) if (image[i] > 0) painted++;
  return {type: chart.config.type, across, labels: chart.data.labels || null,
          values: chart.data.datasets[0].data.map((d) => (typeof d === 'number' ? d : d.y)),
          xs: chart.data.datasets[0].data.map((d) => (typeof d === 'number' ? null : d.x)),
          valueTitle: chart.options.scales[across ? 'x' : 'y'].title.text,
          categoryTitle: chart.options.scales[across ? 'y' : 'x'].title.text,
          colours: meta.data.map((e) => pixel(...centre(e))), painted: painted / (canvas.width * canvas.height)};
})"""
ACCENT = [0x1A, 0x5F, 0xB4]  # the app's accent colour, observed values (static/stats.js)


def _charts(page) -> list[dict]:
    return page.evaluate(CHARTS_DRAWN)


def _close(colour: list[int], expected: list[int], tolerance: int = 30) -> bool:
    return sum(abs(a - b) for a, b in zip(colour, expected, strict=True)) <= tolerance


def _ask(page, question: str, mode: str = "rag"):
    """Ask, and return once the page has drawn this answer: the response arriving is not enough (the page
    renders it after), and the answer box of the previous question is already visible."""
    answered = int(page.get_by_test_id("answer").get_attribute("data-answered") or 0)
    page.get_by_test_id("question").fill(question)
    page.get_by_test_id("mode").select_option(mode)
    page.get_by_test_id("ask").click()
    page.wait_for_function(f"() => document.getElementById('answer').dataset.answered === '{answered + 1}'")
    assert page.get_by_test_id("answer").get_attribute("aria-busy") == "false"
    page.get_by_test_id("error").wait_for(state="hidden")


# The store's names of places that the gapminder CSV names otherwise.
GAPMINDER_NAMES = {"Czechia": "Czech Republic", "Slovakia": "Slovak Republic", "Eswatini": "Swaziland",
                   "Democratic Republic of the Congo": "Congo, Dem. Rep."}


def test_statistics_charts(page, server_url):
    """A series as a line (projections hollow), a ranking as bars across, a comparison as bars; units on the
    axes, source and attribution under each chart; values against the gapminder CSV."""
    page.goto(server_url + "/stats")
    _ask(page, "How has life expectancy changed in Japan?")
    (line,) = _charts(page)
    years = list(range(1952, 2008, 5))
    assert (line["type"], line["xs"]) == ("line", years)
    assert line["values"] == [gapminder("Japan", year, "lifeExp") for year in years]
    assert (line["valueTitle"], line["categoryTitle"]) == ("Life expectancy (years)", "Year")
    assert all(_close(c, ACCENT) for c in line["colours"]) and line["painted"] > 0.02  # drawn, filled points
    footer = page.get_by_test_id("chart-footer").locator("p").all_inner_texts()
    assert footer == ["Source: Gapminder, https://www.gapminder.org/data/",
                                   page.get_by_test_id("attribution").inner_text()]
    page.get_by_test_id("chart").screenshot(path=str(ARTIFACTS / "stats-chart-line.png"))

    _ask(page, "median age in Nigeria between 2000 and 2050")  # Systema Globalis, UN projections from 2026
    (projected,) = _charts(page)
    assert projected["xs"] == list(range(2000, 2051)) and projected["values"][-1] == 23.885  # the UN's, by hand
    hollow = [_close(c, [255, 255, 255]) for c in projected["colours"]]
    assert hollow == [year >= 2026 for year in projected["xs"]]
    assert "Dashed line and hollow points: projections" in page.get_by_test_id("chart-footer").inner_text()
    assert "CC BY 4.0" in page.get_by_test_id("chart-footer").inner_text()
    page.get_by_test_id("chart").screenshot(path=str(ARTIFACTS / "stats-chart-projection.png"))

    _ask(page, "Which landlocked countries have the highest life expectancy?")
    (ranking,) = _charts(page)  # the previous chart is gone
    names = [label.split(". ", 1)[1] for label in ranking["labels"]]
    assert ranking["type"] == "bar" and ranking["across"] and names[0] == "Switzerland" and len(names) > 20
    assert ranking["values"] == [gapminder(GAPMINDER_NAMES.get(n, n), 2007, "lifeExp") for n in names]
    assert ranking["values"] == sorted(ranking["values"], reverse=True)
    assert (ranking["valueTitle"], ranking["categoryTitle"]) == ("Life expectancy (years)", "Place, 2007")
    assert all(_close(c, ACCENT) for c in ranking["colours"])
    page.get_by_test_id("chart").screenshot(path=str(ARTIFACTS / "stats-chart-ranking.png"))

    _ask(page, "Compare life expectancy in France and Germany in 2007")
    (comparison,) = _charts(page)
    assert (comparison["type"], comparison["across"], comparison["labels"]) == ("bar", False, ["France", "Germany"])
    assert comparison["values"] == [gapminder("France", 2007, "lifeExp"), gapminder("Germany", 2007, "lifeExp")]
    assert all(_close(c, ACCENT) for c in comparison["colours"])
    page.screenshot(path=str(ARTIFACTS / "stats-chart-comparison.png"), full_page=True)
    assert page.dialogs == [] and page.script_errors == [] and page.csp_violations == []


def test_statistics_resolution_attribution_and_abstention(page, server_url):
    page.goto(server_url + "/stats")
    _ask(page, "What was the life expectancy in Kenya in 2007?", mode="rig")
    assert page.get_by_test_id("resolution").inner_text().startswith(
        "resolved to: Life expectancy (1.00) for Kenya, 2007; also considered: ")
    assert page.get_by_test_id("attribution").inner_text().startswith("Data: Gapminder")
    assert not page.get_by_test_id("abstention").is_visible() and _charts(page) == []  # RIG: no table, no chart

    _ask(page, "What is the GDP of Mars?")
    abstention = page.get_by_test_id("abstention")
    assert abstention.is_visible()
    assert abstention.inner_text() == "No answer from the statistics: no known place named in the question."
    assert "no answer: no known place" in page.get_by_test_id("resolution").inner_text()
    assert not page.get_by_test_id("attribution").is_visible() and _charts(page) == []
    page.screenshot(path=str(ARTIFACTS / "stats-abstention.png"), full_page=True)

    _ask(page, "Compare life expectancy in France and Germany in 2050")  # the excerpt ends in 2007: nearest years
    assert abstention.inner_text().startswith("No answer from the statistics: no value for 2050")
    assert f"2007: {gapminder('France', 2007, 'lifeExp'):.3f} years" in page.get_by_test_id("answer-text").inner_text()
    assert page.dialogs == [] and page.script_errors == [] and page.csp_violations == []
