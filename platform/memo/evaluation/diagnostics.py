"""Three numbers that say where a MeMo result comes from, so a user knows what to fix:

  reflection_coverage  the share of the gold facts the reflections state      -> fix synthesis
  reflections_recited  the share of its own reflections the memory answers     -> fix training
  memory_recall        the share of gold sub-question answers the memory gives  -> fix synthesis' phrasings
                       when asked the gold sub-questions                          (or, if high, the protocol)
                       and what the misses are: echoes of the question (misleading), "I don't know"
                       (honest) or other, wrong answers

memory_recall asks each MuSiQue decomposition step with the gold answers of the earlier steps put in
(so one missed hop does not hide the next); on benchmarks without a decomposition it asks the
question itself. None of these questions is used for training; they only measure.
"""

from __future__ import annotations

import random

from memo.evaluation.baselines import gold_subquestion
from memo.evaluation.benchmarks import Question
from memo.evaluation.metrics import bootstrap_ci, reflection_coverage
from memo.text import adds_nothing, contains_reference, is_idk


def memory_recall(questions: list[Question], memory) -> dict:
    probes = []  # (qid, hop, question for the memory, gold answer, references)
    for q in questions:
        if q.decomposition:
            gold = [d.get("answer", "") for d in q.decomposition]
            for i, d in enumerate(q.decomposition):
                refs = [gold[i]] + (q.aliases if i == len(gold) - 1 else [])
                probes.append((q.qid, i + 1, gold_subquestion(d["question"], gold[:i]), refs))
        else:
            probes.append((q.qid, 1, q.question, [q.answer, *q.aliases]))
    answers = memory.ask([p[2] for p in probes]) if probes else []
    hits = [float(contains_reference(a, p[3])) for p, a in zip(probes, answers)]
    # what the misses are: an abstention is honest, an echo of the question misleads the executive
    misses = [(p, a) for p, a, h in zip(probes, answers, hits) if not h]
    echoes = sum(adds_nothing(p[2], a) for p, a in misses)
    idks = sum(is_idk(a) for _, a in misses)
    by_hop: dict[str, list[float]] = {}
    for p, h in zip(probes, hits):
        by_hop.setdefault(f"hop{p[1]}", []).append(h)
    return {"probes": len(probes), "recall": round(sum(hits) / max(1, len(hits)), 4),
            "recall_ci": bootstrap_ci(hits) if hits else None,
            "by_hop": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_hop.items())},
            "misses": {"echo": round(echoes / max(1, len(probes)), 4), "idk": round(idks / max(1, len(probes)), 4),
                       "wrong": round((len(misses) - echoes - idks) / max(1, len(probes)), 4)},
            "rows": [{"qid": p[0], "hop": p[1], "question": p[2], "gold": p[3][0], "answer": a, "hit": bool(h)}
                     for p, a, h in zip(probes, answers, hits)]}


def reflections_recited(reflections, memory, sample: int = 60) -> dict:
    """The memory asked a sample of its own training questions, verbatim: does its answer contain the
    reflection's answer (normalised)? What training achieved."""
    rows = list(reflections[["question", "answer"]].itertuples(index=False))
    rows = random.Random(0).sample(rows, min(sample, len(rows)))
    answers = memory.ask([r.question for r in rows]) if rows else []
    hits = [float(contains_reference(a, [r.answer])) for r, a in zip(rows, answers)]
    return {"asked": len(rows), "recited": round(sum(hits) / max(1, len(hits)), 4)}


def diagnose(questions: list[Question], memory, reflections=None) -> dict:
    out = {"memory_recall": memory_recall(questions, memory)}
    if reflections is not None and len(reflections):
        out["reflections_recited"] = reflections_recited(reflections, memory)
        out["reflection_coverage"] = reflection_coverage(reflections, questions)
    return out
