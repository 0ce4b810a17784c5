""":class:`LocalSource`: a statistics store as a ``StatSource``, answering resolved questions.

The resolution itself (places, dates, variable, shape) is :mod:`grounding.resolution`; this module
turns a :class:`~grounding.resolution.Resolution` into answers:

- a point (one value: the asked date, the end of an asked range, or the latest observation);
- a table (a series over time, a comparison of several places, or a ranking of the places in a
  continent, region or group);
- an :class:`Explanation` ("resolved to: ... (0.83); also considered: ..."), with the nearest years
  when the asked one has no value (said explicitly, never substituted) and the change between two
  asked years.

Values for years after the last observed one are projections: labelled as such in every result.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from .resolution import (
    CASE_SENSITIVE_ALIASES,
    DEFAULT_THRESHOLD,
    PlaceMatch,
    Resolution,
    Resolver,
    VariableMatch,
    parse_dates,
)
from .store import Observation, Place, StatStore, Variable, open_default_store
from .text import normalize, stem
from .types import PointResult, SourceRef, TableResult, projection_label
from .variable_match import VariableMatcher

__all__ = ["Resolver", "Resolution", "PlaceMatch", "VariableMatch", "LocalSource", "Explanation", "Change",
           "normalize", "stem", "parse_dates", "DEFAULT_THRESHOLD", "CASE_SENSITIVE_ALIASES"]


class Change(BaseModel):
    """The change of one place's value between two asked years."""

    place: str
    place_name: str
    start: PointResult
    end: PointResult
    difference: float
    percent: float | None  # None when the start value is 0


class Explanation(BaseModel):
    """How a question was resolved, for people (``text``) and programs (the fields)."""

    query: str
    resolved: bool  # a variable and a place were found (an answer may still lack the asked year)
    text: str  # "resolved to: Life expectancy (1.00) for Kenya in 2007; also considered: ..."
    variable: VariableMatch | None = None
    also_considered: list[VariableMatch] = Field(default_factory=list)
    places: list[PlaceMatch] = Field(default_factory=list)
    date: str | None = None
    date_range: tuple[str, str] | None = None
    choice: str | None = None
    problem: str | None = None  # why there is no answer
    missing_date: str | None = None  # the asked year has no value ...
    nearest: list[PointResult] = Field(default_factory=list)  # ... these are the closest ones (said, not substituted)
    change: list[Change] = Field(default_factory=list)  # "how did X change between A and B"


def _in_range(date: str, date_range: tuple[str, str] | None) -> bool:
    return date_range is None or date_range[0] <= date[:4] <= date_range[1]


def _shown_date(observation: Observation) -> str:
    return projection_label(observation.date, observation.projection)


class LocalSource:
    """A store as a :class:`~grounding.types.StatSource` (default: the shipped default store)."""

    name = "local"

    def __init__(self, store: StatStore | None = None, threshold: float = DEFAULT_THRESHOLD,
                 matcher: VariableMatcher | None = None, embedding_model: str | None = None):
        """``embedding_model``: as for :class:`~grounding.resolution.Resolver` (``"none"``: lexical only)."""
        self.store = store if store is not None else open_default_store()
        self.resolver = Resolver(self.store, threshold=threshold, matcher=matcher, embedding_model=embedding_model)

    def __repr__(self) -> str:
        return f"LocalSource({self.store!r}, threshold={self.resolver.threshold})"

    def resolve(self, query: str) -> Resolution:
        return self.resolver.resolve(query)

    # ---- helpers ---------------------------------------------------------------------------------------

    def _source_ref(self, variable: Variable, observation: Observation) -> SourceRef | None:
        source = self.store.source(observation.source or variable.source)
        if source is None:
            return None
        return SourceRef(name=source.name, url=variable.source_url or source.url)

    def _attribution(self, variable: Variable, observation: Observation) -> str | None:
        source = self.store.source(observation.source or variable.source)
        return (source.attribution or None) if source is not None else None

    def _pick(self, resolution: Resolution, entity: str) -> Observation | None:
        """The observation a point question asks for: the date, the end of the range, or the latest."""
        assert resolution.variable is not None
        if resolution.date is not None:
            return self.store.observation(entity, resolution.variable.dcid, resolution.date)
        future = resolution.date_range is not None and resolution.date_range[1] != "9999"
        series = [o for o in self.store.series(entity, resolution.variable.dcid, projections=future)
                  if _in_range(o.date, resolution.date_range)]
        return series[-1] if series else None

    def _children(self, resolution: Resolution) -> list[Place]:
        parent = resolution.parent
        if parent.dcid == "Earth":
            return [p for p in self.store.places() if p.type == resolution.child_type]
        return self.store.children(parent.dcid, resolution.child_type)

    def _ranked_children(self, resolution: Resolution) -> tuple[str, list[tuple[Place, Observation]]] | None:
        """(date label, [(child, observation)]) ranked as asked: at the asked date, else each child's
        latest value (in the asked range)."""
        assert resolution.variable is not None and resolution.parent is not None
        children = self._children(resolution)
        rows = [(child, obs) for child in children if (obs := self._pick(resolution, child.dcid)) is not None]
        if not rows:
            return None
        if resolution.date is None:  # each child's latest: rank those of the latest year only when most have it
            dates = sorted({o.date for _, o in rows})
            label = dates[0] if len(dates) == 1 else f"latest available, {dates[0]}-{dates[-1]}"
        else:
            label = resolution.date
        rows.sort(key=lambda r: (r[1].value, r[0].name), reverse=resolution.ranking != "asc")
        if resolution.limit:
            rows = rows[: resolution.limit]
        return label, rows

    def _answerable(self, resolution: Resolution) -> bool:
        return resolution.problem is None and resolution.variable is not None and bool(resolution.places)

    def _point_result(self, query: str, variable: Variable, place: Place, observation: Observation,
                      score: float | None) -> PointResult:
        return PointResult(
            query=query, value=observation.value, unit=observation.unit or variable.unit or None,
            date=observation.date, source=self._source_ref(variable, observation),
            title=f"{variable.name} in {place.name}", variable=variable.dcid, variable_name=variable.name,
            place=place.dcid, place_name=place.name, score=score, projection=observation.projection,
            attribution=self._attribution(variable, observation))

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
        return self._point_result(query, variable, place, observation, resolution.variable.score)

    def table(self, query: str) -> TableResult | None:
        resolution = self.resolve(query)
        if not self._answerable(resolution):
            return None
        variable: Variable = self.store.variable(resolution.variable.dcid)
        common = {"query": query, "unit": variable.unit or None, "variables": [variable.dcid],
                  "score": resolution.variable.score}

        def sourced(first: Observation) -> dict:
            return {**common, "source": self._source_ref(variable, first),
                    "attribution": self._attribution(variable, first)}
        if resolution.child_type:
            ranked = self._ranked_children(resolution)
            if ranked is None:
                return None
            label, rows = ranked
            parent = resolution.parent
            return TableResult(
                **sourced(rows[0][1]), kind="ranking",
                title=f"{variable.name} of {_plural(resolution.child_type)} in {parent.name} ({label})",
                columns=["rank", "place", "date", variable.name],
                rows=[[str(i + 1), place.name, _shown_date(obs), obs.value] for i, (place, obs) in enumerate(rows)],
                places=[place.dcid for place, _ in rows])
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
                **sourced(rows[0][1]), kind="comparison", title=f"{variable.name} in {names}",
                columns=["place", "date", variable.name],
                rows=[[m.name, _shown_date(o), o.value] for m, o in rows], places=[m.dcid for m, _ in rows])
        place = resolution.places[0]
        future = resolution.date_range is not None and resolution.date_range[1] != "9999"
        # A question about a projected year ("median age in Nigeria in 2050") gets the series up to it.
        asked = resolution.date
        series = [o for o in self.store.series(place.dcid, variable.dcid, projections=future or asked is not None)
                  if _in_range(o.date, resolution.date_range) and (future or not o.projection or o.date <= asked)]
        if not series:
            return None
        return TableResult(
            **sourced(series[-1]), kind="series", title=f"{variable.name} in {place.name}", columns=["date", variable.name],
            rows=[[_shown_date(o), o.value] for o in series], places=[place.dcid])

    # ---- explanations ----------------------------------------------------------------------------------

    def nearest(self, resolution: Resolution, entity: str) -> list[Observation]:
        """The observations just before and just after the asked date (for saying so, never substituting)."""
        assert resolution.variable is not None and resolution.date is not None
        series = self.store.series(entity, resolution.variable.dcid, projections=True)
        before = [o for o in series if o.date < resolution.date]
        after = [o for o in series if o.date > resolution.date]
        return before[-1:] + after[:1]

    def changes(self, resolution: Resolution) -> list[Change]:
        """For "how did X change between A and B": each place's values at A and B and the difference."""
        if not (resolution.change and resolution.date_range and resolution.date_range[1] != "9999"
                and resolution.variable is not None and not resolution.child_type):
            return []
        variable = self.store.variable(resolution.variable.dcid)
        found = []
        for match in resolution.places:
            place = self.store.place(match.dcid)
            start = self.store.observation(match.dcid, variable.dcid, resolution.date_range[0])
            end = self.store.observation(match.dcid, variable.dcid, resolution.date_range[1])
            if start is None or end is None:
                continue
            found.append(Change(
                place=place.dcid, place_name=place.name,
                start=self._point_result(resolution.query, variable, place, start, resolution.variable.score),
                end=self._point_result(resolution.query, variable, place, end, resolution.variable.score),
                difference=end.value - start.value,
                percent=None if start.value == 0 else 100 * (end.value - start.value) / abs(start.value)))
        return found

    def explain(self, query: str) -> Explanation:
        """How ``query`` resolves: the variable and its score, the others considered, the places and
        dates, why there is no answer, the nearest years to a missing one, the change between two years."""
        resolution = self.resolve(query)
        chosen = resolution.variable
        others = [c for c in resolution.candidates if chosen is None or c.dcid != chosen.dcid][:3]
        explanation = Explanation(query=query, resolved=self._answerable(resolution), text="", variable=chosen,
                                  also_considered=others, places=resolution.places, date=resolution.date,
                                  date_range=resolution.date_range, choice=resolution.choice,
                                  problem=resolution.problem)
        if explanation.resolved and resolution.date is not None and not resolution.child_type:
            variable = self.store.variable(chosen.dcid)
            for match in resolution.places:
                if self.store.observation(match.dcid, chosen.dcid, resolution.date) is None:
                    explanation.missing_date = resolution.date
                    place = self.store.place(match.dcid)
                    explanation.nearest += [self._point_result(query, variable, place, o, chosen.score)
                                            for o in self.nearest(resolution, match.dcid)]
        if explanation.resolved:
            explanation.change = self.changes(resolution)
        parts = []
        if chosen is not None:
            where = (f"{_plural(resolution.child_type)} in {resolution.parent.name}" if resolution.child_type
                     else ", ".join(p.name for p in resolution.places) or "no place")
            when = resolution.date or ("-".join(resolution.date_range).replace("-9999", " onwards")
                                       if resolution.date_range else "latest")
            parts.append(f"resolved to: {chosen.name} ({chosen.score:.2f}) for {where}, {when}")
        else:
            parts.append("not resolved")
        if others:
            parts.append("also considered: " + ", ".join(f"{c.name} ({c.score:.2f})" for c in others))
        if resolution.choice:
            parts.append(resolution.choice)
        if resolution.problem:
            parts.append(f"no answer: {resolution.problem}")
        explanation.text = "; ".join(parts)
        return explanation


def _plural(place_type: str) -> str:
    return {"Country": "countries", "City": "cities", "State": "states"}.get(place_type, place_type.lower() + "s")
