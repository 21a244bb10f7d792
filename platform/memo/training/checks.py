"""What a trained memory knows, asked right after training and by the promotion gate: its own
reflections (memorization), and questions it never saw verbatim (held-out paraphrases, eval files)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from memo.corpus import read_jsonl
from memo.errors import MemoError
from memo.engines.memory import MemoryEngine
from memo.text import item_score, normalize_answer, token_f1

log = logging.getLogger(__name__)


def load_eval_items(paths: list[str]) -> list[dict]:
    """QA rows {question, answer, aliases?} from JSONL files; a bad line names the file and line."""
    items = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise MemoError(f"--qa {p}: no such file")
        for n, r in read_jsonl(p, "a question object"):
            if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
                raise MemoError(f"{p}:{n}: needs string fields question and answer")
            items.append({"question": r["question"], "answer": r["answer"], "aliases": list(r.get("aliases", []))})
        if not items:
            raise MemoError(f"{p}: no questions in this file")
    return items


def heldout_check(memory: MemoryEngine, rows: list[dict], label: str) -> dict:
    """Ask questions never trained on verbatim; scored like the promotion gate (reference or alias
    contained in the reply, else token F1), plus the plain containment rate."""
    scores, _ = score_items(memory, rows)
    hits = sum(s == 1.0 for s in scores)
    log.info(f"[train] {label}: {hits}/{len(rows)} answered with the reference (score {sum(scores) / len(rows):.2f})")
    key = label.split()[0]
    return {f"{key}_contains": round(hits / len(rows), 4), f"{key}_score": round(sum(scores) / len(rows), 4),
            f"{key}_n": len(rows)}


def score_items(memory: MemoryEngine, items: list[dict], max_new_tokens: int = 48) -> tuple[list[float], list[str]]:
    """Ask every {question, answer, aliases?} item and score the replies: the one scoring rule of the
    post-training held-out check and the promotion gate."""
    answers = [r.text for r in memory.ask([x["question"] for x in items], max_new_tokens)]
    return [item_score(a, [x["answer"], *x.get("aliases", [])]) for a, x in zip(answers, items)], answers


def memorization_check(memory: MemoryEngine, df: pd.DataFrame, sample: int) -> dict:
    """Ask the trained memory a sample of its own reflections: exact match after normalisation."""
    if sample <= 0:
        return {}
    rows = df.sample(n=min(sample, len(df)), random_state=0)
    max_new = min(160, max(len(memory.tok(a)["input_ids"]) for a in rows["answer"]) + 4)
    answers = [r.text for r in memory.ask(list(rows["question"]), max_new)]
    hits = [normalize_answer(a) == normalize_answer(ref) for a, ref in zip(answers, rows["answer"])]
    f1 = sum(token_f1(a, ref) for a, ref in zip(answers, rows["answer"])) / len(hits)
    recall = sum(hits) / len(hits)
    log.info(f"[train] memorization check: {sum(hits)}/{len(hits)} sampled training reflections reproduced exactly "
             f"(normalized EM {recall:.0%}, token F1 {f1:.2f})")
    return {"train_recall": round(recall, 4), "train_f1": round(f1, 4), "train_recall_n": len(hits)}
