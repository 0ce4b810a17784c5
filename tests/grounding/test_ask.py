"""``ask`` end to end on the embedded store, through a Data Commons client on the local server, and via the CLI.

Expected numbers are read from the gapminder package's CSV (the data set's upstream), not from our store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import Fault  # tests/grounding/conftest.py: imported at collection, as test_faults.py does
from gapminder_truth import gapminder

from grounding import Answer, ask
from grounding.server import start_server
from grounding.sources import open_source

REPO = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).with_name("gemma-ground"))]  # the installed console script




KENYA_2007 = "What was the life expectancy in Kenya in 2007?"


def test_rig_without_model_states_the_statistic_with_its_source():
    answer = ask(KENYA_2007, mode="rig")
    (stat,) = answer.statistics
    assert stat.value == gapminder("Kenya", 2007, "lifeExp") and stat.date == "2007" and stat.place == "country/KEN"
    assert answer.text == "Life expectancy in Kenya was 54.11 years in 2007, according to Gapminder [1]."
    assert answer.footnotes == ["[1] - Per Gapminder, value was 54.11 years in 2007. "
                                "See more at https://www.gapminder.org/data/"]
    assert answer.model is None and not answer.no_answer


def test_rag_without_model_gives_the_table_and_cites_it():
    answer = ask(KENYA_2007, mode="rag")
    (table,) = answer.tables
    assert table.number == 1 and answer.citations == [1]
    rows = {str(date): value for date, value in table.table.rows}
    assert rows["1952"] == gapminder("Kenya", 1952, "lifeExp") and rows["2007"] == gapminder("Kenya", 2007, "lifeExp")
    assert "54.11 years in 2007" in answer.text and "[Table 1]" in answer.text
    assert answer.render().count("Table 1: Life expectancy in Kenya (unit: years), according to Gapminder") == 1


def test_child_places_table_and_no_data():
    africa = ask("Life expectancy of countries in Africa in 2007")
    values = sorted(row[-1] for row in africa.tables[0].table.rows)
    assert len(values) == 52 and values[0] == gapminder("Swaziland", 2007, "lifeExp")
    assert "Réunion was" not in africa.text  # one ranked value is not the answer to a table question
    richest = ask("Which country in Asia had the highest GDP per capita in 2007?")
    assert f"first: Kuwait, {gapminder('Kuwait', 2007, 'gdpPercap'):.2f} USD" in richest.text
    # (Russia, the old example here, has its population in Systema Globalis now.)
    new_mexico = ask("What was the population of New Mexico in 2007?", mode="rig")
    assert new_mexico.no_answer and new_mexico.statistics == [] and "No statistics" in new_mexico.text
    with pytest.raises(ValueError, match="mode"):
        ask(KENYA_2007, mode="sql")


class Scripted:
    def __init__(self, *answers):
        self.answers, self.prompts, self.name = list(answers), [], "scripted"

    def generate(self, prompt, *, max_new_tokens=512, temperature=0.0, stop=None):
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def stream(self, prompt, **kw):
        yield self.generate(prompt, **kw)


def test_ask_with_a_model_rag_and_rig_on_the_embedded_store(default_store):
    llm = Scripted("What is life expectancy in Kenya?\nWhat is the population in Kenya?\n",
                   "Life expectancy rose to 54.11 years by 2007 [Table 1] while the population grew [Table 2], "
                   "see also [Table 5].")
    rag = ask("How have Kenyans fared?", mode="rag", llm=llm)
    assert [t.table.title for t in rag.tables] == ["Life expectancy in Kenya", "Population in Kenya"]
    assert (rag.citations, rag.invalid_citations) == ([1, 2], [5])
    assert "Table 2: Population in Kenya" in llm.prompts[1] and "warning" in rag.render()
    # The model wrote the text; the numbers it cites still come with their source's attribution line,
    # how each lookup resolved, and the charts of the tables it cites.
    (excerpt,) = rag.attribution
    assert excerpt == default_store.source("Gapminder").attribution and excerpt in rag.render()
    assert list(rag.explanations) == ["What is life expectancy in Kenya?", "What is the population in Kenya?"]
    assert rag.explanations["What is life expectancy in Kenya?"].startswith("resolved to: Life expectancy (1.00)")
    assert [c.title for c in rag.charts] == ["Table 1: Life expectancy in Kenya", "Table 2: Population in Kenya"]
    rig_llm = Scripted('Kenyans lived [__DC__("life expectancy in Kenya in 2007") --> "58 years"] on average, and '
                       '[__DC__("median age in Nigeria in 2050") --> "24 years"] is the median age of Nigerians in '
                       '2050 [__DC__("rainfall on Mars") --> "0 mm"].')
    rig = ask(KENYA_2007, mode="rig", llm=rig_llm)
    kenya, nigeria, mars = rig.claims
    assert kenya.dc_value == gapminder("Kenya", 2007, "lifeExp") and kenya.differs  # 58 is 7% off
    assert nigeria.dc_value == 23.885 and mars.dc_value is None  # (ddf--datapoints--median_age_years, nga 2050)
    assert rig.text.startswith("Kenyans lived [__DC__#1(54.11 years [1]* || 58 years)] on average")
    assert rig_llm.prompts == [KENYA_2007]
    assert rig.attribution == [excerpt, default_store.attribution] and rig.attribution[1] in rig.render()
    assert [kenya.attribution, nigeria.attribution, mars.attribution] == [*rig.attribution, None]
    assert "no answer" in rig.explanations["rainfall on Mars"] and len(rig.explanations) == 3
    fallback = ask("What is life on Mars like?", mode="rag", llm=Scripted("What is the rainfall on Mars?\n", "Dry."))
    assert fallback.fallback and fallback.attribution == [] and fallback.charts == []  # the model's own words


def test_ask_through_a_data_commons_client_on_the_local_server():
    with start_server() as server:
        remote = ask(KENYA_2007, mode="rig", source=open_source("nl", base_url=server.url))
    local = ask(KENYA_2007, mode="rig")
    assert remote.statistics[0].value == local.statistics[0].value == gapminder("Kenya", 2007, "lifeExp")
    assert remote.statistics[0].date == "2007"


def run_cli(*args, env=None, timeout=120):
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_ask_json_in_a_subprocess():
    done = run_cli("ask", KENYA_2007, "--mode", "rig", "--json")
    assert done.returncode == 0, done.stderr
    answer = Answer.model_validate_json(done.stdout)
    assert answer.statistics[0].value == gapminder("Kenya", 2007, "lifeExp") and answer.mode == "rig"
    refused = run_cli("ask", KENYA_2007, "--source", "nl", env={"DC_API_KEY": ""})
    assert refused.returncode == 2 and "DC_API_KEY" in refused.stderr and "Traceback" not in refused.stderr


def test_cli_ask_exits_non_zero_when_every_lookup_failed(fault_server, capsys, monkeypatch):
    """A failed answer exits 1 and says why; no data for a question (the source answered) exits 0. In
    process, through the console script's ``main``."""
    from models.cli import main

    monkeypatch.delenv("DC_API_KEY", raising=False)
    fault_server.plan("/nodejs/query", [Fault(status=400, body='{"message": "bad request"}')] * 4)
    for source, url in (("nl", fault_server.url), ("rest", f"{fault_server.url}/v2")):
        code = main(["ask", KENYA_2007, "--source", source, "--base-url", url])
        out, err = capsys.readouterr()
        assert code == 1, (source, out, err)
        assert "every statistics lookup failed" in err and "lookup failed" in out  # the reason, twice
    assert main(["ask", "What is the capital of France?", "--mode", "rig"]) == 0
    assert "No statistics" in capsys.readouterr().out
    assert not ask(KENYA_2007, mode="rig").failed
    monkeypatch.setenv("DC_API_KEY", "k")  # too short to be a key (and to redact without mangling text)
    assert main(["ask", KENYA_2007, "--source", "nl", "--base-url", fault_server.url]) == 2
    err = capsys.readouterr().err
    assert "1 characters" in err and "***" not in err  # refused, not redacted into nonsense
    assert not ask(KENYA_2007, mode="rig").failed  # the local store does not use the key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_stats_serves_the_embedded_store():
    port = _free_port()
    process = subprocess.Popen(CLI + ["serve-stats", "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/nodejs/query?" + urllib.parse.urlencode(
            {"q": KENYA_2007, "mode": "toolformer_rig", "allCharts": "1", "idx": "base_uae_mem"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.load(response)
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "serve-stats did not answer within 60 s"
                time.sleep(0.2)
        assert data["charts"][0]["highlight"]["value"] == gapminder("Kenya", 2007, "lifeExp")
    finally:
        process.terminate()
        process.wait(timeout=10)
    missing = run_cli("serve-stats", "--store", str(REPO / "no-such-store.sqlite"))
    assert missing.returncode == 2 and "no such store file" in missing.stderr


def test_example_runs_offline_in_seconds():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "examples/ask_statistics.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Life expectancy in Kenya was 54.11 years in 2007, according to Gapminder [1]." in done.stdout
    assert "[__DC__#1(54.11 years [1]* || 57 years)]" in done.stdout
    assert time.monotonic() - start < 60
