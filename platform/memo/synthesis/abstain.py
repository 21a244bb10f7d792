"""Abstention: questions about names the corpus never mentions, answered "I don't know" (train as you
serve: the memory learns to abstain on an unknown entity, the executive treats it as no information)."""

from __future__ import annotations

import hashlib

import pandas as pd

from memo.synthesis.schema import reflection_frame
from memo.text import IDK_ANSWER, find_spans

# Question words are capitalised too: "Where does X ..." must swap X, not "Where".
_WH = {"Who", "Whom", "Whose", "What", "When", "Where", "Which", "Why", "How", "Is", "Was", "Are", "Were", "Did",
       "Does", "Do", "Can", "Name", "List"}
_SYLLABLES = ["bar", "dun", "mo", "rel", "vik", "sta", "lor", "quin", "te", "zar", "ost", "hel"]


def abstain_rows(reflections: pd.DataFrame, corpus_text: str, ratio: float, domain: str,
                 generator: str) -> pd.DataFrame:
    """Real direct questions with their name swapped for an invented one, so the memory learns to abstain
    on an unknown entity rather than on an unusual question shape."""
    direct = reflections[reflections.step == "direct"]
    n = int(round(len(reflections) * ratio))
    rows = []
    for r in direct.itertuples():
        if len(rows) >= n:
            break
        names = [sp for sp in find_spans(r.question) if sp["kind"] == "name" and sp["text"].split()[0] not in _WH]
        if not names:
            continue
        h = int(hashlib.sha256(r.question.encode()).hexdigest(), 16)
        fake = (_SYLLABLES[h % 12] + _SYLLABLES[(h >> 4) % 12] + _SYLLABLES[(h >> 8) % 12]).capitalize()
        if fake.lower() in corpus_text.lower():
            continue
        words = names[0]["text"].split()
        new_name = " ".join([fake] + words[1:]) if len(words) > 1 else fake
        rows.append({"step": "abstain", "question": r.question.replace(names[0]["text"], new_name),
                     "answer": IDK_ANSWER, "source_chunk_ids": r.source_chunk_ids, "verified": True})
    return reflection_frame(rows, domain, generator)
