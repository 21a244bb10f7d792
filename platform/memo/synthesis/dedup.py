"""Duplicate questions: exact (the same normalised question, i.e. the same id), then near duplicates
found with MinHash LSH (datasketch) over word 3-shingles and confirmed with the exact Jaccard."""

from __future__ import annotations

import re

import pandas as pd
from datasketch import MinHash, MinHashLSH


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _shingles(text: str, n: int = 3) -> set[str]:
    words = _words(text)
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else {""}


def near_duplicates(questions: list[str], answers: list[str] | None = None, threshold: float = 0.8,
                    num_perm: int = 64) -> list[int]:
    """Indexes to drop: each question whose shingle Jaccard with an earlier kept one is >= threshold.

    With `answers`, the answers must overlap too (word Jaccard >= 0.5): "Who was born in Lyon in 1950?"
    asked of two different people is two facts, not a duplicate.
    """
    if threshold >= 1.0 or len(questions) < 2:
        return []
    shingles = [_shingles(q) for q in questions]
    words = [set(_words(a)) for a in answers] if answers else None
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    drop: list[int] = []

    def same(i: int, j: int) -> bool:  # LSH proposes candidates; the exact Jaccard decides
        if len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j]) < threshold:
            return False
        return not words or len(words[i] & words[j]) / max(1, len(words[i] | words[j])) >= 0.5

    for i, sh in enumerate(shingles):
        m = MinHash(num_perm=num_perm, seed=1234)
        m.update_batch([s.encode() for s in sh])
        if any(same(i, j) for j in lsh.query(m)):
            drop.append(i)
            continue
        lsh.insert(i, m)
    return drop


def dedup(pairs: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, dict]:
    """Exact duplicates (same id) then near duplicates; returns the kept pairs and the counts."""
    before = len(pairs)
    pairs = pairs.drop_duplicates("id").reset_index(drop=True)
    exact = before - len(pairs)
    drop = near_duplicates(list(pairs["question"]), list(pairs["answer"]), threshold)
    pairs = pairs.drop(index=drop).reset_index(drop=True)
    return pairs, {"exact": exact, "near": len(drop), "near_threshold": threshold}
