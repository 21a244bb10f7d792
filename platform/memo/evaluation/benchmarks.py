"""Benchmark loaders: MuSiQue, HotpotQA (distractor), 2WikiMultihopQA, NarrativeQA (summaries).

Each loader reads the benchmark's public JSONL format and returns the corpus the memory is built from
(the gold and distractor paragraphs of the selected questions, deduplicated by title and text) and the
questions with their reference answers and aliases. `noise` adds the paragraphs of that many times as
many other questions as distractors (kept to the same `distractors` per record), so cost and accuracy
can be measured as the corpus grows (the paper's noise test). The
data files are third-party: read them where they are, never copy them into the repository.

    memo corpus --benchmark musique --data ../shared/data/benchmarks/musique/musique_ans_dev.sample80.jsonl \\
        --limit 20 --out /tmp/musique20     # corpus.jsonl for `memo synthesize`, questions.jsonl for checks
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memo.config import BENCHMARKS
from memo.corpus import Document, read_jsonl
from memo.errors import MemoError, where


@dataclass
class Question:
    qid: str
    question: str
    answer: str
    aliases: list[str] = field(default_factory=list)
    gold_doc_ids: list[str] = field(default_factory=list)
    decomposition: list[dict] = field(default_factory=list)  # MuSiQue: [{question, answer}], "#1" = answer 1
    kind: str = ""


def _doc_id(title: str, text: str) -> str:
    return "p-" + hashlib.sha256(f"{title}\x00{text}".encode()).hexdigest()[:12]


def _paragraphs(name: str, row: dict, loc: str) -> list[tuple[str, str, bool]]:
    """(title, text, is_gold) for one record, in the benchmark's own layout."""
    try:
        if name == "musique":
            return [(p["title"], p["paragraph_text"], bool(p.get("is_supporting"))) for p in row["paragraphs"]]
        if name in ("hotpotqa", "2wiki"):
            gold = {t for t, _ in row.get("supporting_facts", [])}
            return [(t, " ".join(s.strip() for s in sents), t in gold) for t, sents in row["context"]]
        return [("", row["passage"], True)]
    except (KeyError, TypeError, ValueError) as e:
        raise MemoError(f"{loc}: not a {name} record (missing or malformed {e})") from None


def _question(name: str, row: dict, loc: str, gold: list[str]) -> Question:
    try:
        if name == "musique":
            return Question(row["id"], row["question"], row["answer"], list(row.get("answer_aliases", [])), gold,
                            [{"question": d["question"], "answer": d["answer"]} for d in row["question_decomposition"]],
                            row["id"].split("__")[0])
        if name == "hotpotqa":
            return Question(row["_id"], row["question"], row["answer"], [], gold, [], row.get("type", ""))
        if name == "2wiki":
            return Question(row["_id"], row["question"], row["answer"], list(row.get("answer_aliases", [])), gold, [],
                            row.get("type", ""))
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return Question("", row["question"], answers[0], answers[1:], gold, [], "summary")
    except (KeyError, TypeError, IndexError) as e:
        raise MemoError(f"{loc}: not a {name} record (missing or malformed {e})") from None


def load_benchmark(name: str, path: str | Path, limit: int | None = None, noise: float = 0.0,
                   distractors: int | None = None) -> tuple[list[Document], list[Question]]:
    """(corpus, questions) for the first `limit` questions of a benchmark file. `distractors` keeps at
    most that many non-gold paragraphs per question (None: all of them), so a CPU-sized run can keep the
    gold evidence and still carry distractors."""
    if name not in BENCHMARKS:
        raise MemoError(f"--benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    p = Path(path)
    if not p.exists():
        raise MemoError(f"--data {p}: no such file")
    if limit is not None and limit < 1:
        raise MemoError(f"--limit {limit}: use 1 or more")
    if noise < 0:
        raise MemoError(f"--noise {noise}: use 0 or more (extra distractors, as a multiple of the questions)")
    if distractors is not None and distractors < 0:
        raise MemoError(f"--distractors {distractors}: use 0 or more (non-gold paragraphs kept per question)")
    records = list(read_jsonl(p, f"a {name} record"))
    if not records:
        raise MemoError(f"{p}: no records")
    n = min(limit or len(records), len(records))
    n_noise = min(int(round(noise * n)), len(records) - n)
    docs: dict[str, Document] = {}
    questions: list[Question] = []
    for k, (line, row) in enumerate(records[:n + n_noise]):
        loc = where(p, line)
        gold, kept = [], 0
        for title, text, is_gold in _paragraphs(name, row, loc):
            # noise records are trimmed like the questions' own, so `noise` grows the corpus by that multiple
            if not is_gold and distractors is not None:
                if kept >= distractors:
                    continue
                kept += 1
            did = _doc_id(title, text)
            docs.setdefault(did, Document(did, title, text, "", loc))
            if is_gold:
                gold.append(did)
        if k < n:  # the rest only contribute distractor paragraphs
            q = _question(name, row, loc, gold)
            q.qid = q.qid or f"{p.stem}-{line}"
            questions.append(q)
    return list(docs.values()), questions


def write_corpus(docs: list[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n")


def write_benchmark(docs: list[Document], questions: list[Question], out: str | Path) -> dict:
    """OUT/corpus.jsonl (the `memo synthesize` input) and OUT/questions.jsonl (question, answer, aliases)."""
    o = Path(out)
    write_corpus(docs, o / "corpus.jsonl")
    with open(o / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(asdict(q)) + "\n")
    return {"documents": len(docs), "questions": len(questions), "out": str(o)}
