"""Place names in free text: countries, US states and US counties as Data Commons dcids.

:class:`Gazetteer` finds every place name or alias in a text by word-tuple lookup, longest match first
and without overlaps ("Guinea-Bissau" before "Guinea", "Washington County" before "Washington"), and
keeps the character span of each mention so that callers can cut it out of the text (variable search
matches the rest). Lookups ignore case, accents, punctuation and a leading "the"; aliases that are
also English words ("US", "IN", "OR") only match when written in capitals.

Several places may share a name (there are 31 Washington Counties). A mention lists every candidate,
best first: a state named right after a county ("Jackson County, Missouri", "Jackson County in
Missouri") picks that state's county; otherwise places of the more prominent type come first
(``type_priority``: countries, then states, then counties) and ``ambiguous`` says that the first is a
guess. :meth:`Gazetteer.resolve` returns the mention a statistical question is about: the last one, as
in "<statistic> in <place>".

The default data (``grounding/data/gazetteer.csv``, built by :mod:`grounding.data.build_gazetteer`
from GeoNames) uses Data Commons dcids: ``country/ISO3``, ``geoId/SS`` (state FIPS) and
``geoId/SSCCC`` (county FIPS). Any place list of the store's shape works too.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

from .types import GroundingError

__all__ = ["Gazetteer", "GazetteerPlace", "PlaceMention", "GazetteerError", "DEFAULT_GAZETTEER_PATH",
           "words_with_spans"]

DEFAULT_GAZETTEER_PATH = Path(__file__).resolve().parent / "data" / "gazetteer.csv"
DEFAULT_TYPE_PRIORITY = ("Country", "State", "County")
# Codes written in capitals ("IN", "US", "CAN", "AND") are also everyday words: such an alias of at most
# this many letters counts only when the text writes it in capitals too.
_UPPERCASE_ONLY_LENGTH = 3


class GazetteerError(GroundingError):
    """A place file that cannot be read: names the file, the line and the problem."""


class GazetteerPlace(BaseModel):
    dcid: str
    name: str
    type: str
    parent: str | None = None  # the containing place's dcid (a county's state)
    aliases: list[str] = Field(default_factory=list)


class PlaceMention(BaseModel):
    """A place named in a text: where, as written, and every place of that name, best first."""

    start: int  # character offsets of the mention in the text
    end: int
    text: str
    candidates: list[GazetteerPlace]
    ambiguous: bool = False  # several candidates and nothing in the text to choose between them

    @property
    def place(self) -> GazetteerPlace:
        return self.candidates[0]


# Initialisms with dots ("U.S.", "U.K.") are one word; otherwise words are letters and digits with inner
# apostrophes ("d'ivoire", "kenya's").
_WORD = re.compile(r"(?:[^\W\d_]\.){2,}|[^\W_]+(?:['’`][^\W_]+)*")


def _fold(word: str) -> str:
    word = unicodedata.normalize("NFKD", word)
    word = "".join(c for c in word if not unicodedata.combining(c)).lower()
    word = re.sub(r"['’`]s$", "", word)  # possessive: "kenya's" -> "kenya"
    return re.sub(r"['’`.]", "", word)


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """The text's words, folded (lower case, no accents, no apostrophes), with their character spans."""
    out = []
    for m in _WORD.finditer(text):
        folded = _fold(m.group(0))
        if folded:
            out.append((folded, m.start(), m.end()))
    return out


def _phrase(text: str) -> tuple[str, ...]:
    words = tuple(w for w, _, _ in words_with_spans(text.replace(".", "")))
    return words[1:] if len(words) > 1 and words[0] == "the" else words


class Gazetteer:
    def __init__(self, places: Iterable[GazetteerPlace], *, type_priority: Sequence[str] = DEFAULT_TYPE_PRIORITY):
        self.places = list(places)
        self.by_dcid = {p.dcid: p for p in self.places}
        self.type_priority = list(type_priority)
        self._phrases: dict[tuple[str, ...], list[GazetteerPlace]] = {}
        self._uppercase_only: set[tuple[str, ...]] = set()
        for place in self.places:
            for i, alias in enumerate([place.name, *place.aliases]):
                words = _phrase(alias)
                if not words:
                    continue
                bucket = self._phrases.setdefault(words, [])
                if place not in bucket:
                    bucket.append(place)
                letters = alias.replace(".", "")
                if i > 0 and letters.isupper() and len("".join(words)) <= _UPPERCASE_ONLY_LENGTH:
                    self._uppercase_only.add(words)
        self._max_words = max((len(p) for p in self._phrases), default=1)

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs) -> Gazetteer:
        """Places from a CSV of the store's place shape: ``dcid,name,type[,parent][,aliases]``."""
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = {"dcid", "name", "type"} - set(reader.fieldnames or [])
                if missing:
                    raise GazetteerError(f"{path}: missing columns {sorted(missing)} (expected dcid,name,type,"
                                         "parent,aliases)")
                places = []
                for line, row in enumerate(reader, start=2):
                    if not (row.get("dcid") or "").strip() or not (row.get("name") or "").strip():
                        raise GazetteerError(f"{path}:{line}: empty dcid or name")
                    places.append(GazetteerPlace(
                        dcid=row["dcid"].strip(), name=row["name"].strip(), type=(row.get("type") or "").strip(),
                        parent=(row.get("parent") or "").split(";")[0].strip() or None,
                        aliases=[a.strip() for a in (row.get("aliases") or "").split(";") if a.strip()]))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise GazetteerError(f"{path}: unreadable place file ({e})") from None
        return cls(places, **kwargs)

    @classmethod
    def default(cls) -> Gazetteer:
        """Countries, US states and counties shipped with the package (cached)."""
        return _default_gazetteer()

    def _rank(self, candidates: list[GazetteerPlace]) -> list[GazetteerPlace]:
        order = {t: i for i, t in enumerate(self.type_priority)}
        return sorted(candidates, key=lambda p: order.get(p.type, len(order)))

    def find(self, text: str) -> list[PlaceMention]:
        """Every place mention in the text, without overlaps, longest first, in text order."""
        words = words_with_spans(text)
        keys = [w for w, _, _ in words]
        taken = [False] * len(words)
        found: list[tuple[int, int, list[GazetteerPlace]]] = []
        for size in range(min(self._max_words, len(words)), 0, -1):
            for start in range(len(words) - size + 1):
                phrase = tuple(keys[start:start + size])
                if phrase not in self._phrases or any(taken[start:start + size]):
                    continue
                if phrase in self._uppercase_only and not text[words[start][1]:words[start][2]].isupper():
                    continue
                found.append((start, start + size, self._rank(self._phrases[phrase])))
                taken[start:start + size] = [True] * size
        found.sort(key=lambda m: m[0])
        mentions = []
        for start, end, candidates in found:
            first = start - 1 if start > 0 and keys[start - 1] == "the" else start
            s, e = words[first][1], words[end - 1][2]
            mentions.append(PlaceMention(start=s, end=e, text=text[s:e], candidates=candidates))
        return self._use_context(text, mentions)

    def _use_context(self, text: str, mentions: list[PlaceMention]) -> list[PlaceMention]:
        """Narrow a county by the state named right after it; drop that state's own mention."""
        out: list[PlaceMention] = []
        skip = set()
        for i, mention in enumerate(mentions):
            if i in skip:
                continue
            candidates = mention.candidates
            if i + 1 < len(mentions) and len(candidates) > 1:
                states = {p.dcid for p in mentions[i + 1].candidates if p.type == "State"}
                inside = [p for p in candidates if p.parent in states]
                if inside:
                    nxt = mentions[i + 1]
                    mention = PlaceMention(start=mention.start, end=nxt.end, text=text[mention.start:nxt.end],
                                           candidates=inside + [p for p in candidates if p not in inside])
                    skip.add(i + 1)
                    out.append(mention.model_copy(update={"ambiguous": len(inside) > 1}))
                    continue
            same_type = [p for p in candidates if p.type == candidates[0].type]
            out.append(mention.model_copy(update={"ambiguous": len(same_type) > 1}))
        return out

    def resolve(self, text: str) -> PlaceMention | None:
        """The place a statistical question is about: its last mention ("... in Texas"), or None."""
        mentions = self.find(text)
        return mentions[-1] if mentions else None

    def remove_places(self, text: str, mentions: list[PlaceMention] | None = None) -> str:
        """The text without its place mentions and the preposition before each ("in", "of", "for")."""
        mentions = self.find(text) if mentions is None else mentions
        out, cursor = [], 0
        for mention in mentions:
            before = re.sub(r"\b(in|of|for|at|within|across)\s*$", "", text[cursor:mention.start], flags=re.IGNORECASE)
            out.append(before)
            cursor = mention.end
        out.append(text[cursor:])
        return re.sub(r"\s+", " ", "".join(out)).strip(" ,?[]()")


@lru_cache(maxsize=1)
def _default_gazetteer() -> Gazetteer:
    return Gazetteer.from_csv(DEFAULT_GAZETTEER_PATH)
