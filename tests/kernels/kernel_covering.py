"""A small pairwise (2-way covering) test design: every pair of values of any two factors appears
in at least one case, in far fewer cases than the full product (the interpreter is slow)."""

from __future__ import annotations

import random
from itertools import combinations


def pairwise(factors: dict[str, list], seed: int = 0, tries: int = 24) -> list[dict]:
    """Cases (dicts factor -> value) covering every pair of factor values; deterministic per seed."""
    names = list(factors)
    sizes = {n: len(factors[n]) for n in names}
    uncovered = {(a, i, b, j) for a, b in combinations(names, 2)
                 for i in range(sizes[a]) for j in range(sizes[b])}
    rng = random.Random(seed)

    def new_pairs(case: dict) -> set:
        assigned = [n for n in names if n in case]
        pairs = set()
        for a, b in combinations(assigned, 2):
            key = (a, case[a], b, case[b])
            if key in uncovered:
                pairs.add(key)
        return pairs

    cases = []
    while uncovered:
        best, best_pairs = None, set()
        for _ in range(tries):
            a, i, b, j = rng.choice(sorted(uncovered))
            case = {a: i, b: j}
            rest = [n for n in names if n not in case]
            rng.shuffle(rest)
            for n in rest:
                gains = [len(new_pairs({**case, n: v})) for v in range(sizes[n])]
                top = max(gains)
                case[n] = rng.choice([v for v, g in enumerate(gains) if g == top])
            pairs = new_pairs(case)
            if len(pairs) > len(best_pairs):
                best, best_pairs = case, pairs
        uncovered -= best_pairs
        cases.append({n: factors[n][best[n]] for n in names})
    return cases


def covers_all_pairs(factors: dict[str, list], cases: list[dict]) -> bool:
    for a, b in combinations(factors, 2):
        for va in factors[a]:
            for vb in factors[b]:
                if not any(_same(c[a], va) and _same(c[b], vb) for c in cases):
                    return False
    return True


def _same(x, y) -> bool:
    return x is y or (type(x) is type(y) and x == y)
