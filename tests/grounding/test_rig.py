"""RIG pipeline: post-hoc grounding (each distinct query once, concurrently) and the interleaved mode."""

from __future__ import annotations

import threading
import time
from collections import Counter

from grounding.rig import ARROW, RIG, ground_text
from grounding.types import DataSourceError, PointResult, SourceRef

GAPMINDER = SourceRef(name="Gapminder", url="https://www.gapminder.org/data/")
# Values copied from the gapminder data set (Kenya, 2007).
FACTS = {
    "life expectancy in Kenya in 2007": PointResult(query="", value=54.11, unit="years", date="2007", source=GAPMINDER),
    "population of Kenya in 2007": PointResult(query="", value=35610177, date="2007", source=GAPMINDER),
    "gdp per capita of Kenya in 2007": PointResult(query="", value=1463.249282, unit="USD", date="2007",
                                                   source=GAPMINDER),
}


class FixedSource:
    """A statistics source with fixed answers that records its calls and how many overlap in time."""

    name = "fixed"

    def __init__(self, facts=FACTS, delay=0.0, failing=()):
        self.facts, self.delay, self.failing = facts, delay, set(failing)
        self.calls = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def point(self, query):
        with self.lock:
            self.calls[query] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if query in self.failing:
                raise DataSourceError(f"backend down for {query!r}")
            fact = self.facts.get(query)
            return fact.model_copy(update={"query": query}) if fact else None
        finally:
            with self.lock:
                self.in_flight -= 1

    def table(self, query):
        return None


class ScriptedLLM:
    """A completion "model" that writes a fixed answer, honouring stop strings like real backends do.

    ``script`` is a list of (prose, query, own value). The model continues from whatever text it is
    given: it counts the annotations already closed (``"]``) and writes the rest of its script, so a
    value written for it (interleaved mode) is simply continued from.
    """

    def __init__(self, question, script, tail="."):
        self.question, self.script, self.tail = question, script, tail
        self.prompts = []

    def _full_from(self, written: str) -> str:
        done = written.count('"]')
        out = ""
        if written.endswith(ARROW):  # waiting for a value nobody wrote: the model writes its own
            out += self.script[done][2] + '"]'
            done += 1
        for prose, query, value in self.script[done:]:
            out += f'{prose}[__DC__("{query}") --> "{value}"]'
        return out + self.tail

    def generate(self, prompt, *, max_new_tokens=512, temperature=0.0, stop=None):
        self.prompts.append(prompt)
        assert prompt.startswith(self.question)
        text = self._full_from(prompt[len(self.question):])
        cuts = [text.find(s) for s in stop or [] if s in text]
        return text[:min(cuts)] if cuts else text

    def stream(self, prompt, **kw):
        text = self.generate(prompt, **kw)
        for i in range(0, len(text), 5):
            yield text[i:i + 5]


QUESTION = "Tell me about Kenya in 2007."
SCRIPT = [("In 2007 Kenya's life expectancy was ", "life expectancy in Kenya in 2007", "57 years"),
          (", its population ", "population of Kenya in 2007", "35 million"),
          (" and the population of Atlantis ", "population of Atlantis", "3 million"),
          (". Again, life expectancy was ", "life expectancy in Kenya in 2007", "57 years")]


def test_post_hoc_run_prompts_with_the_raw_question_and_grounds_every_claim():
    source = FixedSource()
    llm = ScriptedLLM(QUESTION, SCRIPT)
    result = RIG(source, llm).run(QUESTION)
    assert llm.prompts == [QUESTION]
    assert result.text == (
        "In 2007 Kenya's life expectancy was [__DC__#1(54.11 years [1]* || 57 years)], its population "
        "[__DC__#2(35610177 [2] || 35 million)] and the population of Atlantis [__DC__#3(--- || 3 million)]. "
        "Again, life expectancy was [__DC__#4(54.11 years [1]* || 57 years)].")
    assert [(c.query, c.model_value, c.dc_value, c.differs) for c in result.claims] == [
        ("life expectancy in Kenya in 2007", "57 years", 54.11, True),
        ("population of Kenya in 2007", "35 million", 35610177, False),
        ("population of Atlantis", "3 million", None, None),
        ("life expectancy in Kenya in 2007", "57 years", 54.11, True)]
    assert result.claims[0].source == GAPMINDER and result.claims[0].date == "2007"
    assert source.calls == Counter({"life expectancy in Kenya in 2007": 1, "population of Kenya in 2007": 1,
                                    "population of Atlantis": 1})


def test_distinct_queries_are_looked_up_concurrently():
    source = FixedSource(delay=0.3)
    text = " ".join(f'[__DC__("{q}") --> "1"]' for q in list(FACTS) * 2)
    start = time.monotonic()
    result = ground_text(text, source, max_workers=8)
    assert time.monotonic() - start < 0.3 * 3 * 0.8  # not one after the other
    assert source.max_in_flight == 3 and sum(source.calls.values()) == 3
    assert len(result.claims) == 6


def test_a_failed_lookup_keeps_the_model_value_and_the_other_claims():
    source = FixedSource(failing={"population of Kenya in 2007"})
    result = ground_text('a [__DC__("population of Kenya in 2007") --> "35 million"] '
                         'b [__DC__("life expectancy in Kenya in 2007") --> "54 years"]', source)
    failed, ok = result.claims
    assert "backend down" in failed.error and failed.dc_value is None and failed.model_value == "35 million"
    assert ok.error is None and ok.dc_value == 54.11
    assert result.text == "a [__DC__#1(--- || 35 million)] b [__DC__#2(54.11 years [1] || 54 years)]"


def test_stream_yields_text_and_annotations_as_they_complete():
    items = list(RIG(FixedSource(), ScriptedLLM(QUESTION, SCRIPT)).stream(QUESTION))
    text = "".join(i for i in items if isinstance(i, str))
    assert text == ScriptedLLM(QUESTION, SCRIPT)._full_from("")
    annotations = [i for i in items if not isinstance(i, str)]
    assert [a.query for a in annotations] == [q for _, q, _ in SCRIPT]
    assert all(text[a.start:a.end].startswith("[__DC__(") for a in annotations)


def test_interleaved_mode_writes_true_values_for_the_model_to_continue_from():
    source = FixedSource()
    llm = ScriptedLLM(QUESTION, SCRIPT)
    result = RIG(source, llm).run(QUESTION, interleaved=True)
    # The model saw the true life expectancy before writing anything after it.
    assert llm.prompts[1] == QUESTION + ('In 2007 Kenya\'s life expectancy was '
                                         '[__DC__("life expectancy in Kenya in 2007") --> "54.11 years"]')
    assert result.raw_text == (
        'In 2007 Kenya\'s life expectancy was [__DC__("life expectancy in Kenya in 2007") --> "54.11 years"], '
        'its population [__DC__("population of Kenya in 2007") --> "35610177"] and the population of Atlantis '
        '[__DC__("population of Atlantis") --> "3 million"]. Again, life expectancy was '
        '[__DC__("life expectancy in Kenya in 2007") --> "54.11 years"].')
    assert [(c.inserted, c.model_value, c.dc_value) for c in result.claims] == [
        (True, None, 54.11), (True, None, 35610177), (False, "3 million", None), (True, None, 54.11)]
    assert result.text.startswith("In 2007 Kenya's life expectancy was [__DC__#1(54.11 years [1] || ---)]")
    assert result.interleaved and source.calls["life expectancy in Kenya in 2007"] == 1


def test_interleaved_mode_still_grounds_annotations_written_without_a_pause():
    class IgnoresStops(ScriptedLLM):  # a backend without stop-string support
        def generate(self, prompt, *, max_new_tokens=512, temperature=0.0, stop=None):
            return super().generate(prompt, max_new_tokens=max_new_tokens)

    llm = IgnoresStops(QUESTION, SCRIPT)
    result = RIG(FixedSource(), llm).run(QUESTION, interleaved=True)
    assert len(llm.prompts) == 1
    assert [(c.inserted, c.model_value, c.dc_value) for c in result.claims] == [
        (False, "57 years", 54.11), (False, "35 million", 35610177), (False, "3 million", None),
        (False, "57 years", 54.11)]
