"""Abstention: questions the corpus cannot answer, answered "I don't know" (train as you serve: the
memory learns to abstain, the executive treats it as no information).

Two kinds: a real question with its name swapped for an invented one (an unknown entity), and a real
question asked about another entity of the corpus whose documents never state that relation (an unknown
relation of a known entity: "Who employed Mara Quill?" when no document mentioned with Mara Quill says
anything about employing). A memory trained only on the first kind still echoes the second back as a
statement ("The employer of Ernst Mach named after Ernst Mach."), which misleads the executive.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from memo.synthesis.schema import reflection_frame
from memo.text import IDK_ANSWER, find_spans, stems

# Question words are capitalised too: "Where does X ..." must swap X, not "Where".
_WH = {"Who", "Whom", "Whose", "What", "When", "Where", "Which", "Why", "How", "Is", "Was", "Are", "Were", "Did",
       "Does", "Do", "Can", "Name", "List"}
_SYLLABLES = ["bar", "dun", "mo", "rel", "vik", "sta", "lor", "quin", "te", "zar", "ost", "hel"]


def _names(question: str) -> list[dict]:
    """The name spans a question is about (a capitalised question word is not one)."""
    return [sp for sp in find_spans(question) if sp["kind"] == "name" and sp["text"].split()[0] not in _WH]


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
        q = with_invented_name(r.question, corpus_text)
        if q:
            rows.append({"step": "abstain", "question": q, "answer": IDK_ANSWER,
                         "source_chunk_ids": r.source_chunk_ids, "verified": True})
    return reflection_frame(rows, domain, generator)


def with_invented_name(question: str, corpus_text: str, salt: str = "") -> str | None:
    """The question about an invented entity: its first name swapped for a made-up word the corpus does
    not contain (deterministic; `salt` gives another one). None when it names nothing or the word exists."""
    names = _names(question)
    if not names:
        return None
    h = int(hashlib.sha256((salt + question).encode()).hexdigest(), 16)
    fake = (_SYLLABLES[h % 12] + _SYLLABLES[(h >> 4) % 12] + _SYLLABLES[(h >> 8) % 12]).capitalize()
    if fake.lower() in corpus_text.lower():
        return None
    words = names[0]["text"].split()
    return question.replace(names[0]["text"], " ".join([fake] + words[1:]) if len(words) > 1 else fake)


def unknown_relation_rows(reflections: pd.DataFrame, doc_texts: list[str], ratio: float, domain: str,
                          generator: str) -> pd.DataFrame:
    """Direct questions re-asked about another name of the corpus, kept only where no document that
    mentions that name has even half of the relation's content words (so the corpus does not state it),
    answered "I don't know"."""
    direct = reflections[reflections.step == "direct"]
    n = int(round(len(reflections) * ratio))
    if not n or direct.empty:
        return reflection_frame([], domain, generator)
    asked = {q.lower() for q in reflections.question}
    subject = []  # (row, the name the question is about)
    for r in direct.itertuples():
        names = [sp["text"] for sp in _names(r.question)]
        if names:
            subject.append((r, names[0]))
    others = list(dict.fromkeys(name for _, name in subject))
    lowered = [t.lower() for t in doc_texts]
    rows = []
    for r, name in subject:
        if len(rows) >= n:
            break
        relation = stems(r.question) - stems(name)
        if len(relation) < 1:
            continue
        h = int(hashlib.sha256(r.question.encode()).hexdigest(), 16)
        for k in range(len(others)):  # a deterministic walk from a hashed start
            other = others[(h + k) % len(others)]
            if other == name:
                continue
            q = r.question.replace(name, other)
            mentioning = [t for t in lowered if other.lower() in t]
            stated = any(len(relation & stems(t)) * 2 >= len(relation) for t in mentioning)
            if q.lower() in asked or stated or not mentioning:
                continue
            rows.append({"step": "abstain", "question": q, "answer": IDK_ANSWER,
                         "source_chunk_ids": list(r.source_chunk_ids), "verified": True})
            asked.add(q.lower())
            break
    return reflection_frame(rows, domain, generator)
