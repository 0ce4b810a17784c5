"""Text helpers shared by the resolver, the variable matchers and the server: normalization and stems."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize", "stem", "STOPWORDS"]

STOPWORDS = set("""
a an the of in on at for to from by and or with about as is are was were be been being what whats which who
whom how many much does do did has have had tell me show give list find get please i we you it its this that
these those there their value values number data statistic statistics stat stats figure figures amount level
levels rate current currently latest recent most newest now today year years ago country countries nation
nations place places compare comparison versus vs between than over time since until through during
change changed changes trend trends history historical evolution grow grew growth according us our
world worldwide globally global earth
""".split())


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
