"""Matching the words of a question to statistical variables: the interface and a lexical matcher.

The resolver asks a :class:`VariableMatcher` for ranked :class:`VariableCandidate` s (best first, each
with a score in 0..1 and the reason it matched) and abstains when the best is below the matcher's
``threshold``. :class:`LexicalVariableIndex` is the matcher that needs nothing but the store: every
variable's name and aliases are phrases, and a phrase scores the fraction of its words found in the
question (a word counts fully when equal after a plural ``s``, a synonym or "per capita" spelt
another way, partly when a typo away). The description scores how many of the question's content
words it contains (at most 0.8). Ties are broken by how many of the question's words the variable
explains, then by how few words of its name the question left out, then by the store's preference
(``priority``: lower first), so "life expectancy of women" finds the female series and "life
expectancy" the general one.

The hybrid lexical + dense index (``grounding.variable_index``) implements the same interface, and
the resolver's default (``grounding.variable_index.HybridVariableMatcher``) fuses the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from difflib import SequenceMatcher
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from .text import STOPWORDS, normalize, stem

__all__ = ["VariableDoc", "VariableCandidate", "VariableMatcher", "LexicalVariableIndex", "canonical_words",
           "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.75

# Words that mean the same thing in a statistic's name (after stemming).
SYNONYMS = {
    "women": "female", "woman": "female", "men": "male", "man": "male",
    "kid": "child", "children": "child",
    "homicide": "murder", "murdered": "murder", "jobless": "unemployment", "unemployed": "unemployment",
    "cellphone": "cell", "mobile": "cell", "doctor": "doctor", "physician": "doctor",
    "percentage": "percent", "share": "percent",
}
PER_CAPITA = re.compile(r"\b(?:per (?:capita|person|head|inhabitant)|capita)\b")


def canonical_words(text: str) -> list[str]:
    """Normalized words with "per capita" spellings joined into one word ``percapita``."""
    return PER_CAPITA.sub("percapita", normalize(text)).split()


def _canon(word: str) -> str:
    stemmed = stem(word)
    return SYNONYMS.get(word, SYNONYMS.get(stemmed, stemmed))


def _typo_similarity(a: str, b: str) -> float:
    """The edit similarity of two long words that are a typo apart, else 0."""
    if min(len(a), len(b)) < 5 or a[0] != b[0] or abs(len(a) - len(b)) > 2:
        return 0.0
    ratio = SequenceMatcher(None, a, b).ratio()
    return ratio if ratio >= 0.84 else 0.0


class VariableDoc(BaseModel):
    """What a matcher knows of a variable."""

    dcid: str
    name: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)


class VariableCandidate(BaseModel):
    """One ranked match: ``score`` decides (0..1); the parts and the reason explain it."""

    dcid: str
    score: float
    lexical_score: float
    dense_score: float = 0.0
    reason: str
    coverage: float | None = None  # share of the question's content words the variable's text explains


@runtime_checkable
class VariableMatcher(Protocol):
    threshold: float

    def search(self, query: str, k: int = 10) -> list[VariableCandidate]: ...


class _Phrase:
    __slots__ = ("text", "words")

    def __init__(self, text: str):
        self.text = text
        self.words = tuple(canonical_words(text))


class LexicalVariableIndex:
    """The lexical matcher over a list of :class:`VariableDoc` (see the module docstring)."""

    def __init__(self, docs: Sequence[VariableDoc], *, threshold: float = DEFAULT_THRESHOLD,
                 priority: dict[str, float] | None = None):
        self.threshold = threshold
        self.docs = list(docs)
        self._priority = priority or {}
        self._phrases = {d.dcid: [_Phrase(t) for t in dict.fromkeys([d.name, *d.aliases]) if normalize(t)]
                         for d in self.docs}
        self._description = {d.dcid: {_canon(w) for w in canonical_words(f"{d.name} {d.description}")}
                             for d in self.docs}
        self._vocabulary = {d.dcid: self._description[d.dcid] | {
            _canon(w) for p in self._phrases[d.dcid] for w in p.words} for d in self.docs}
        self._name_words = {d.dcid: {w for w in canonical_words(d.name) if w not in STOPWORDS} for d in self.docs}
        self._raw_words = {w for phrases in self._phrases.values() for p in phrases for w in p.words}

    @classmethod
    def build(cls, docs: Iterable[VariableDoc], **settings) -> LexicalVariableIndex:
        return cls(list(docs), **settings)

    def _similarities(self, words: list[str]) -> dict[str, float]:
        """For each word of any phrase, its best similarity to a word of the question."""
        canon = {_canon(w) for w in words}
        best: dict[str, float] = {}
        for word in self._raw_words:
            if word in words or _canon(word) in canon:
                best[word] = 1.0
                continue
            score = max((_typo_similarity(word, w) for w in words), default=0.0)
            if score:
                best[word] = score
        return best

    def search(self, query: str | list[str], k: int = 10) -> list[VariableCandidate]:
        """The ``k`` best variables for ``query`` (text, or already normalized words), best first."""
        words = canonical_words(query) if isinstance(query, str) else canonical_words(" ".join(query))
        content = [w for w in words if w not in STOPWORDS and not w.isdigit()]
        content_canon = [_canon(w) for w in content]
        sims = self._similarities(words)
        ranked = []
        for doc in self.docs:
            best = (0.0, 0, "")
            for phrase in self._phrases[doc.dcid]:
                found = [sims.get(w, 0.0) for w in phrase.words]
                score = sum(found) / len(found)
                best = max(best, (score, sum(1 for s in found if s > 0), f"name/alias {phrase.text!r}"))
            vocabulary = self._vocabulary[doc.dcid]
            if len(content) >= 2:  # one shared word ("gdp", "us") is not evidence enough
                in_description = sum(1 for w in content_canon if w in self._description[doc.dcid])
                if in_description >= 2:
                    best = max(best, (0.8 * in_description / len(content), in_description,
                                      f"description ({in_description}/{len(content)} words)"))
            explained = sum(1 for w in content_canon if w in vocabulary)
            left_out = sum(1 for w in self._name_words[doc.dcid] if sims.get(w, 0.0) == 0.0)
            score, matched, reason = best
            ranked.append(((-round(score, 4), -matched, -explained, left_out,
                            self._priority.get(doc.dcid, 0.0), doc.dcid), score, reason, explained))
        ranked.sort(key=lambda r: r[0])
        return [VariableCandidate(dcid=key[-1], score=round(score, 4), lexical_score=round(score, 4),
                                  reason=f"{reason}; explains {explained}/{len(content)} question words",
                                  coverage=round(explained / len(content), 4) if content else None)
                for key, score, reason, explained in ranked[:k]]
