"""RIG annotation parser (property tests) and substitution (golden cases written by hand)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.rig import AnnotationParser, format_number, parse_annotations, parse_number, substitute
from grounding.types import PointResult, SourceRef

# Prose never contains the marker, and never ends in '[' / '$' or starts with ']' (those characters
# would legitimately become part of an adjacent annotation's span).
PROSE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?()'-\n", max_size=40)
QUERY = st.text(alphabet='abcdefghijklmnopqrstuvwxyz ABC0123456789?,.-"\\()[]', min_size=1, max_size=50).filter(
    lambda q: q.strip() != "")
PLAIN_QUERY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABC0123456789?,.-", min_size=1, max_size=50).filter(
    lambda q: q.strip() != "")
VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz 0123456789.,%$-[]", min_size=1, max_size=20).filter(
    lambda v: v.strip() != "")


def written(query: str, value: str) -> str:
    """The annotation as the model writes it, quotes and backslashes escaped (independent of the parser)."""
    escaped = query.replace("\\", "\\\\").replace('"', '\\"')
    return f'[__DC__("{escaped}") --> "{value}"]'


@st.composite
def documents(draw, query=QUERY, malform=False):
    """(text, [(query, value, start, end)]) with annotations between prose."""
    n = draw(st.integers(0, 4))
    text = draw(PROSE)
    expected = []
    for _ in range(n):
        q, v = draw(query), draw(VALUE)
        piece = written(q, v)
        if malform:
            kind = draw(st.sampled_from(["no [", "$", "$ and no [", "no ]", "escaped quotes", "no ] at end"]))
            if kind == "no [":
                piece = piece[1:]
            elif kind == "$":
                piece = "$" + piece
            elif kind == "$ and no [":
                piece = "$" + piece[1:]
            elif kind in ("no ]", "no ] at end"):
                piece = piece[:-1]
            elif kind == "escaped quotes":
                piece = f'[__DC__(\\"{q}\\") --> \\"{v}\\"]'
        start = len(text)
        text += piece
        expected.append((q.strip(), v.strip(), start, len(text)))
        text += draw(PROSE)
    return text, expected


def as_tuples(annotations):
    return [(a.query, a.model_value, a.start, a.end) for a in annotations]


@settings(max_examples=200, deadline=None)
@given(documents())
def test_round_trip(doc):
    text, expected = doc
    assert as_tuples(parse_annotations(text)) == expected


@settings(max_examples=200, deadline=None)
@given(documents(query=PLAIN_QUERY, malform=True))
def test_malformed_annotations_keep_query_value_and_span(doc):
    text, expected = doc
    assert as_tuples(parse_annotations(text)) == expected


@settings(max_examples=200, deadline=None)
@given(documents(), st.lists(st.integers(1, 12), max_size=60))
def test_streamed_text_parses_like_the_whole_text(doc, cuts):
    text, expected = doc
    parser, found, i = AnnotationParser(), [], 0
    for size in cuts:
        found += parser.feed(text[i:i + size])
        i += size
    found += parser.feed(text[i:])
    found += parser.close()
    assert as_tuples(found) == expected


def test_annotation_is_emitted_only_when_complete():
    parser = AnnotationParser()
    assert parser.feed('Kenya had [__DC__("life expectancy in Kenya") --> "5') == []
    assert parser.feed('4 years"') == []  # a ']' may still come
    (ann,) = parser.feed("] in 2007.")
    assert (ann.query, ann.model_value, ann.problems) == ("life expectancy in Kenya", "54 years", [])


def test_malformations_are_reported():
    (ann,) = parse_annotations('x $__DC__("pop of Peru") --> "27 million" and more')
    assert ann.query == "pop of Peru" and ann.model_value == "27 million"
    assert set(ann.problems) == {"stray '$'", "missing '['", "missing ']'"}


def test_value_missing_and_cut_off_annotations():
    (no_value,) = parse_annotations('A [__DC__("pop of Peru")] b')
    assert (no_value.model_value, no_value.end) == (None, len('A [__DC__("pop of Peru")]'))
    (cut,) = parse_annotations('A [__DC__("pop of Peru") --> "27 mil')
    assert cut.model_value == "27 mil" and "unterminated value" in cut.problems


def test_text_that_is_not_an_annotation():
    assert parse_annotations("the __DC__ marker alone, __DC__ (no quote) and [__DC__] are prose") == []


def test_parse_number():
    assert parse_number("61.8 years") == 61.8
    assert parse_number("$1.2 billion") == 1.2e9
    assert parse_number("about 3,500 people") == 3500
    assert parse_number("45%") == 45
    assert parse_number("35.6 million") == 35.6e6
    assert parse_number("unknown") is None


def test_format_number():
    assert [format_number(v) for v in (35610177.0, 54.11, 47306.98978, 1463.249282, 0.000123456789, -3.5)] == [
        "35610177", "54.11", "47306.99", "1463.25", "0.000123457", "-3.5"]


# -- substitution: golden cases ------------------------------------------------------------------
KENYA_LIFE = PointResult(query="life expectancy in Kenya in 2007", value=54.11, unit="years", date="2007",
                         source=SourceRef(name="Gapminder", url="https://www.gapminder.org/data/"))
KENYA_POP = PointResult(query="population of Kenya in 2007", value=35610177, date="2007",
                        source=SourceRef(name="Gapminder", url="https://www.gapminder.org/data/"))
FOOT_LIFE = ("[1] - Per Gapminder, value was 54.11 years in 2007. See more at https://www.gapminder.org/data/")


def run(text, results):
    return substitute(text, parse_annotations(text), results)


def test_substitution_close_value_has_no_flag():
    text = 'Kenya: [__DC__("life expectancy in Kenya in 2007") --> "54 years"].'
    out = run(text, {KENYA_LIFE.query: KENYA_LIFE})
    assert out.text == "Kenya: [__DC__#1(54.11 years [1] || 54 years)]."
    assert out.footnotes == [FOOT_LIFE]
    (claim,) = out.claims
    assert (claim.dc_value, claim.model_number, claim.differs, claim.source.name) == (54.11, 54, False, "Gapminder")


def test_substitution_five_percent_flag():
    # 54.11 * 1.05 = 56.8155: 56.8 is within 5%, 56.9 is not.
    text = ('a [__DC__("life expectancy in Kenya in 2007") --> "56.8 years"] '
            'b [__DC__("life expectancy in Kenya in 2007") --> "56.9 years"] '
            'c [__DC__("population of Kenya in 2007") --> "35.6 million"] '
            'd [__DC__("population of Kenya in 2007") --> "38 million"]')
    out = run(text, {KENYA_LIFE.query: KENYA_LIFE, KENYA_POP.query: KENYA_POP})
    assert out.text == ("a [__DC__#1(54.11 years [1] || 56.8 years)] "
                        "b [__DC__#2(54.11 years [1]* || 56.9 years)] "
                        "c [__DC__#3(35610177 [2] || 35.6 million)] "
                        "d [__DC__#4(35610177 [2]* || 38 million)]")
    assert out.footnotes == [FOOT_LIFE, "[2] - Per Gapminder, value was 35610177 in 2007. "
                                        "See more at https://www.gapminder.org/data/"]
    assert [c.differs for c in out.claims] == [False, True, False, True]


def test_substitution_repeated_queries_share_a_footnote():
    text = ('[__DC__("life expectancy in Kenya in 2007") --> "54 years"] and again '
            '[__DC__("life expectancy in Kenya in 2007") --> "54 years"]')
    out = run(text, {KENYA_LIFE.query: KENYA_LIFE})
    assert out.text == ("[__DC__#1(54.11 years [1] || 54 years)] and again "
                        "[__DC__#2(54.11 years [1] || 54 years)]")
    assert len(out.footnotes) == 1


def test_substitution_missing_values():
    text = ('p [__DC__("population of Atlantis") --> "5 million"] '
            'q [__DC__("life expectancy in Kenya in 2007")] '
            'r [__DC__("population of Atlantis")].')
    out = run(text, {KENYA_LIFE.query: KENYA_LIFE, "population of Atlantis": None})
    assert out.text == ("p [__DC__#1(--- || 5 million)] "
                        "q [__DC__#2(54.11 years [1] || ---)] "
                        "r [__DC__#3(--- || ---)].")
    assert [c.differs for c in out.claims] == [None, None, None]
    assert out.footnotes == [FOOT_LIFE]


def test_substitution_is_by_span_for_malformed_annotations():
    # The same annotation text twice, once without its closing bracket: each is replaced where it is.
    text = ('$[__DC__("life expectancy in Kenya in 2007") --> "54 years" then '
            '[__DC__("life expectancy in Kenya in 2007") --> "54 years"] end')
    out = run(text, {KENYA_LIFE.query: KENYA_LIFE})
    assert out.text == ("[__DC__#1(54.11 years [1] || 54 years)] then "
                        "[__DC__#2(54.11 years [1] || 54 years)] end")


def test_a_stray_marker_before_a_long_text_stays_text_and_streaming_stays_fast():
    import time

    parser, found = AnnotationParser(), []
    start = time.monotonic()
    found += parser.feed('prose [__DC__("')
    for _ in range(3000):  # a quote that never closes, streamed word by word
        found += parser.feed("word ")
    found += parser.feed('[__DC__("population of Peru") --> "27 million"] end')
    found += parser.close()
    assert time.monotonic() - start < 5  # bounded re-parsing (unbounded took > 10 s)
    assert [(a.query, a.model_value) for a in found] == [("population of Peru", "27 million")]
