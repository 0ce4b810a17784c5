"""Natural-language resolver of the local store, and :class:`LocalSource`, the store as a ``StatSource``.

A question is resolved in four independent steps, each explainable:

1. **Places** by gazetteer: every place name and alias in the store, matched on word boundaries,
   longest match first ("Guinea-Bissau" before "Guinea", "South Sudan" before "Sudan"). Short aliases
   that are also English words ("US", "CAR") only match when written in capitals.
2. **Dates**: a year ("in 2007"), a range ("between 1952 and 1977", "since 1990", "in the 1990s"),
   or "latest" / no date (the most recent observation).
3. **Variable** by lexical + fuzzy matching of the remaining words against each variable's name,
   aliases and description. A phrase scores the fraction of its words found in the question (a word
   counts fully when equal or equal after a plural ``s``, partly when a typo away); the description
   scores how many of the question's content words it contains. The best variable wins when its score
   reaches ``threshold``; ties go to the longer matched phrase ("life expectancy" beats "people").
4. **Shape**: child places ("countries in Africa", "African countries", "the richest country in
   Europe"), ranking direction and top-N, comparison of several places, change over time.

Anything unresolved gives "no data" (``None``) with the reason in ``Resolution.problem``; the resolver
never substitutes a nearby year, a parent place or a similar variable.
"""

from __future__ import annotations

import re
import unicodedata
from difflib import SequenceMatcher
from typing import Literal

from pydantic import BaseModel, Field

from .store import Observation, Place, Store, Variable, open_default_store
from .types import PointResult, SourceRef, TableResult

__all__ = ["Resolver", "Resolution", "PlaceMatch", "VariableMatch", "LocalSource", "normalize", "stem", "parse_dates",
           "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.75

# Short aliases that are also ordinary English words: they only count when written in capitals.
CASE_SENSITIVE_ALIASES = {"us", "car", "eu"}

STOPWORDS = set("""
a an the of in on at for to from by and or with about as is are was were be been being what whats which who
whom how many much does do did has have had tell me show give list find get please i we you it its this that
these those there their value values number data statistic statistics stat stats figure figures amount level
levels rate current currently latest recent most newest now today year years ago country countries nation
nations place places compare comparison versus vs between than over time since until through during
change changed changes trend trends history historical evolution grow grew growth according us our
world worldwide globally global earth
""".split())

# Words that narrow a statistic to a group or a derived quantity. When the matched variable does not
# mention one of them, the store holds the wrong statistic for the question: answer "no data".
QUALIFIERS = set("""
female females women woman girls girl male males men man boys boy urban rural infant infants child children
kids elderly adult adults youth teen teens teenage rate rates ratio percent percentage share median
growth annual change per_cent total household households family families
""".split()) - {"per_cent"}
WORLD_WORDS = {"world", "worldwide", "globally", "global", "earth"}

RANK_DESCENDING = {"highest", "most", "largest", "biggest", "top", "richest", "wealthiest", "longest", "best",
                   "greatest", "max", "maximum", "rank", "ranking", "ranked", "leading"}
RANK_ASCENDING = {"lowest", "least", "smallest", "poorest", "shortest", "worst", "fewest", "min", "minimum",
                  "bottom"}
OVER_TIME_WORDS = {"change", "changed", "changes", "trend", "trends", "history", "historical", "evolution",
                   "evolved", "grow", "grew", "growth", "over"}
# Words naming the places inside a place. Only plurals for sub-national types: "the state of ..." is not
# a request for states.
CHILD_WORDS = {"countries": "Country", "country": "Country", "nations": "Country", "nation": "Country",
               "states": "State", "provinces": "AdministrativeArea1", "regions": "AdministrativeArea1",
               "districts": "AdministrativeArea2", "counties": "County", "cities": "City"}
NUMBER_WORDS = {"three": 3, "five": 5, "ten": 10, "two": 2, "four": 4, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "twenty": 20, "fifteen": 15, "twelve": 12}


def normalize(text: str) -> str:
    """Lower-case, strip accents, turn punctuation into spaces (keeps letters, digits and spaces)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[’'`]s\b", "", text)  # possessive: "kenya's" -> "kenya"
    text = re.sub(r"(?<=\b[a-z])\.(?=[a-z]\b)", "", text)  # "u.s." -> "us." ; "u.k." -> "uk."
    text = re.sub(r"[’'`]", "", text)
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return text.strip()


def stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _word_similarity(a: str, b: str) -> float:
    """1 for equal words (or equal stems), the edit similarity for long near-equal words (typos), else 0."""
    if a == b or stem(a) == stem(b):
        return 1.0
    if min(len(a), len(b)) < 5 or a[0] != b[0]:
        return 0.0
    ratio = SequenceMatcher(None, a, b).ratio()
    return ratio if ratio >= 0.84 else 0.0


class PlaceMatch(BaseModel):
    dcid: str
    name: str
    type: str
    matched: str  # the words of the question that named it


class VariableMatch(BaseModel):
    dcid: str
    name: str
    score: float
    matched: str  # the name/alias/description that matched best


class Resolution(BaseModel):
    """What a question asks for, as far as the store's vocabulary can tell."""

    query: str
    places: list[PlaceMatch] = Field(default_factory=list)
    variable: VariableMatch | None = None
    candidates: list[VariableMatch] = Field(default_factory=list)  # best few, best first (for debugging)
    date: str | None = None  # one requested date; None = latest (or a range)
    date_range: tuple[str, str] | None = None  # inclusive, for "between 1952 and 1977", "since 1990"
    child_type: str | None = None  # "Country" for "countries in Africa"
    ranking: Literal["desc", "asc"] | None = None
    limit: int | None = None  # "top 5"
    over_time: bool = False
    problem: str | None = None  # why the question cannot be answered, when it cannot

    @property
    def parent(self) -> PlaceMatch | None:
        return self.places[0] if self.child_type and self.places else None


def parse_dates(text: str) -> tuple[str | None, tuple[str, str] | None, list[tuple[int, int]]]:
    """(single date, inclusive range, character spans used) from a question; years 1800-2099."""
    spans = []
    decade = re.search(r"\b(1[89]\d0|20\d0)s\b", text)
    years = [(m.group(0), m.span()) for m in re.finditer(r"\b(1[89]\d\d|20\d\d)\b(?!s)", text)]
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
    """Place names and aliases as word tuples, for longest-first matching."""

    def __init__(self, places: list[Place]):
        self.phrases: dict[tuple[str, ...], list[Place]] = {}
        self.case_sensitive: set[tuple[str, ...]] = set()
        for place in places:
            for alias in [place.name, *place.aliases]:
                words = tuple(normalize(alias).split())
                if not words:
                    continue
                bucket = self.phrases.setdefault(words, [])
                if place not in bucket:
                    bucket.append(place)
                if len(words) == 1 and words[0] in CASE_SENSITIVE_ALIASES:
                    self.case_sensitive.add(words)
        self.max_words = max((len(p) for p in self.phrases), default=1)

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
                    continue  # "us" the pronoun, "US$" the currency
                # An ambiguous alias is resolved by preferring a Country, then the first listed.
                candidates = sorted(self.phrases[phrase], key=lambda p: p.type != "Country")
                found.append((start, start + size, candidates[0]))
                for i in range(start, start + size):
                    taken[i] = True
        return sorted(found, key=lambda m: m[0])


class Resolver:
    """Resolves questions against one store's places and variables."""

    def __init__(self, store: Store, threshold: float = DEFAULT_THRESHOLD):
        self.store = store
        self.threshold = threshold
        self._gazetteer = _Gazetteer(store.places())
        self._variables = store.variables()
        self._phrases = {
            v.dcid: [(tuple(normalize(p).split()), p) for p in dict.fromkeys([v.name, *v.aliases]) if normalize(p)]
            for v in self._variables
        }
        self._descriptions = {v.dcid: {stem(w) for w in normalize(f"{v.name} {v.description}").split()}
                              for v in self._variables}

    # ---- steps -----------------------------------------------------------------------------------------

    def match_variables(self, words: list[str]) -> list[VariableMatch]:
        """All variables scored against the question's words, best first."""
        content = [w for w in words if w not in STOPWORDS and not w.isdigit()]
        scored = []
        for variable in self._variables:
            best = (0.0, 0, variable.name)
            for phrase, text in self._phrases[variable.dcid]:
                sims = [max((_word_similarity(p, w) for w in words), default=0.0) for p in phrase]
                score = sum(sims) / len(phrase)
                matched_words = sum(1 for s in sims if s > 0)
                best = max(best, (score, matched_words, text))
            if len(content) >= 2:  # one shared word ("gdp", "us") is not evidence enough
                in_description = sum(1 for w in content if stem(w) in self._descriptions[variable.dcid])
                description_score = 0.8 * in_description / len(content) if in_description >= 2 else 0.0
                best = max(best, (description_score, in_description, f"description of {variable.name}"))
            scored.append((best[0], best[1], variable, best[2]))
        scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
        return [VariableMatch(dcid=v.dcid, name=v.name, score=round(score, 4), matched=text)
                for score, _n, v, text in scored]

    def resolve(self, query: str) -> Resolution:
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
        resolution.limit = _parse_limit(words)

        child_words = [CHILD_WORDS[w] for w in rest if w in CHILD_WORDS]
        areas = [p for p in resolution.places if p.type in ("Continent", "Region")]
        if not resolution.places and (child_words or (resolution.ranking and word_set & WORLD_WORDS)):
            # "which country has the highest life expectancy": every place of that type in the store
            resolution.child_type = child_words[0] if child_words else "Country"
            resolution.places = [PlaceMatch(dcid="Earth", name="the world", type="Place", matched="")]
        elif areas and (child_words or resolution.ranking):
            # "countries in Africa", "African countries", "highest life expectancy in Europe"
            resolution.child_type = child_words[0] if child_words else "Country"
            resolution.places = [areas[0]]
        elif child_words and len(resolution.places) == 1 and resolution.places[0].type == "Country" \
                and child_words[0] != "Country":
            resolution.child_type = child_words[0]  # "states of the US": the store has none -> no data

        candidates = self.match_variables(rest)
        resolution.candidates = candidates[:3]
        if candidates and candidates[0].score >= self.threshold:
            resolution.variable = candidates[0]

        if resolution.variable is not None:
            known = self._descriptions[resolution.variable.dcid] | {
                stem(w) for phrase, _ in self._phrases[resolution.variable.dcid] for w in phrase}
            unmet = [w for w in rest if w in QUALIFIERS and stem(w) not in known]
            if unmet:
                resolution.problem = (f"the question asks about {' '.join(unmet)!r}, which "
                                      f"{resolution.variable.name} does not cover")
                return resolution
        if not resolution.places:
            resolution.problem = "no known place named in the question"
        elif resolution.variable is None:
            best = f" (best: {candidates[0].name}, score {candidates[0].score:.2f})" if candidates else ""
            resolution.problem = f"no variable matched with score >= {self.threshold}{best}"
        return resolution


def _parse_limit(words: list[str]) -> int | None:
    for i, word in enumerate(words[:-1]):
        if word in ("top", "bottom", "first", "last") or words[i + 1] in RANK_DESCENDING | RANK_ASCENDING:
            candidate = words[i + 1] if word in ("top", "bottom", "first", "last") else word
            if candidate.isdigit() and 0 < int(candidate) < 1000:
                return int(candidate)
            if candidate in NUMBER_WORDS:
                return NUMBER_WORDS[candidate]
    return None


def _in_range(date: str, date_range: tuple[str, str] | None) -> bool:
    return date_range is None or date_range[0] <= date[:4] <= date_range[1]


class LocalSource:
    """The embedded store as a :class:`~grounding.types.StatSource` (default: the shipped Gapminder data)."""

    name = "local"

    def __init__(self, store: Store | None = None, threshold: float = DEFAULT_THRESHOLD):
        self.store = store if store is not None else open_default_store()
        self.resolver = Resolver(self.store, threshold=threshold)

    def __repr__(self) -> str:
        return f"LocalSource({self.store!r}, threshold={self.resolver.threshold})"

    def resolve(self, query: str) -> Resolution:
        return self.resolver.resolve(query)

    # ---- helpers ---------------------------------------------------------------------------------------

    def _source_ref(self, observation: Observation) -> SourceRef | None:
        source = self.store.source(observation.source)
        return SourceRef(name=source.name, url=source.url) if source else None

    def _pick(self, resolution: Resolution, entity: str) -> Observation | None:
        """The observation a point question asks for: the date, the end of the range, or the latest."""
        assert resolution.variable is not None
        if resolution.date is not None:
            return self.store.observation(entity, resolution.variable.dcid, resolution.date)
        series = [o for o in self.store.series(entity, resolution.variable.dcid)
                  if _in_range(o.date, resolution.date_range)]
        return series[-1] if series else None

    def _ranked_children(self, resolution: Resolution) -> tuple[str, list[tuple[Place, Observation]]] | None:
        """(date, [(child, observation)]) ranked as asked, at the asked date or the latest one with data."""
        assert resolution.variable is not None and resolution.parent is not None
        variable = resolution.variable.dcid
        if resolution.parent.dcid == "Earth":
            children = [p for p in self.store.places() if p.type == resolution.child_type]
        else:
            children = self.store.children(resolution.parent.dcid, resolution.child_type)
        if resolution.date is not None:
            date = resolution.date
        else:
            dates = [d for d in self.store.dates(variable, [c.dcid for c in children])
                     if _in_range(d, resolution.date_range)]
            if not dates:
                return None
            date = dates[-1]
        rows = [(child, obs) for child in children
                if (obs := self.store.observation(child.dcid, variable, date)) is not None]
        if not rows:
            return None
        rows.sort(key=lambda r: (r[1].value, r[0].name), reverse=resolution.ranking != "asc")
        if resolution.limit:
            rows = rows[: resolution.limit]
        return date, rows

    def _answerable(self, resolution: Resolution) -> bool:
        return resolution.problem is None and resolution.variable is not None and bool(resolution.places)

    # ---- StatSource ------------------------------------------------------------------------------------

    def point(self, query: str) -> PointResult | None:
        resolution = self.resolve(query)
        if not self._answerable(resolution):
            return None
        variable = self.store.variable(resolution.variable.dcid)
        if resolution.child_type:
            ranked = self._ranked_children(resolution)
            if ranked is None:
                return None
            place, observation = ranked[1][0][0], ranked[1][0][1]
        else:
            place, observation = None, None
            for match in resolution.places:  # the first named place that has the value
                observation = self._pick(resolution, match.dcid)
                if observation is not None:
                    place = self.store.place(match.dcid)
                    break
            if observation is None:
                return None
        return PointResult(
            query=query, value=observation.value, unit=observation.unit or variable.unit or None,
            date=observation.date, source=self._source_ref(observation),
            title=f"{variable.name} in {place.name}", variable=variable.dcid, variable_name=variable.name,
            place=place.dcid, place_name=place.name, score=resolution.variable.score)

    def table(self, query: str) -> TableResult | None:
        resolution = self.resolve(query)
        if not self._answerable(resolution):
            return None
        variable: Variable = self.store.variable(resolution.variable.dcid)
        score = resolution.variable.score
        if resolution.child_type:
            ranked = self._ranked_children(resolution)
            if ranked is None:
                return None
            date, rows = ranked
            parent = resolution.parent
            return TableResult(
                query=query, title=f"{variable.name} of {_plural(resolution.child_type)} in {parent.name} ({date})",
                unit=variable.unit or None, source=self._source_ref(rows[0][1]),
                columns=["rank", "place", "date", variable.name],
                rows=[[str(i + 1), place.name, obs.date, obs.value] for i, (place, obs) in enumerate(rows)],
                variables=[variable.dcid], places=[place.dcid for place, _ in rows], score=score)
        if len(resolution.places) > 1:
            rows = []
            for match in resolution.places:
                observation = self._pick(resolution, match.dcid)
                if observation is not None:
                    rows.append((match, observation))
            if not rows:
                return None
            names = ", ".join(m.name for m, _ in rows)
            return TableResult(
                query=query, title=f"{variable.name} in {names}", unit=variable.unit or None,
                source=self._source_ref(rows[0][1]), columns=["place", "date", variable.name],
                rows=[[m.name, o.date, o.value] for m, o in rows], variables=[variable.dcid],
                places=[m.dcid for m, _ in rows], score=score)
        place = resolution.places[0]
        series = [o for o in self.store.series(place.dcid, variable.dcid) if _in_range(o.date, resolution.date_range)]
        if not series:
            return None
        return TableResult(
            query=query, title=f"{variable.name} in {place.name}", unit=variable.unit or None,
            source=self._source_ref(series[-1]), columns=["date", variable.name],
            rows=[[o.date, o.value] for o in series], variables=[variable.dcid], places=[place.dcid], score=score)


def _plural(place_type: str) -> str:
    return {"Country": "countries", "City": "cities", "State": "states"}.get(place_type, place_type.lower() + "s")
