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
from memo.text import adds_nothing, contains_reference, is_idk, normalize_answer


def memory_recall(questions: list[Question], memory, trained: set[str] | None = None) -> dict:
    """`trained`: the memory's training questions; a probe asked in the same words (after normalisation)
    is counted apart (`seen_verbatim`), and `recall_unseen` scores only the others (the honest number)."""
    probes = []  # (qid, hop, question for the memory, gold answer, references)
    for q in questions:
        if q.decomposition:
            gold = [d.get("answer", "") for d in q.decomposition]
            for i, d in enumerate(q.decomposition):
                refs = [gold[i]] + (q.aliases if i == len(gold) - 1 else [])
                probes.append((q.qid, i + 1, gold_subquestion(d["question"], gold[:i]), refs))
        else:
            probes.append((q.qid, 1, q.question, [q.answer, *q.aliases]))
    detailed = getattr(memory, "ask_detailed", None)
    rows = (detailed([p[2] for p in probes]) if detailed else [{"answer": a} for a in memory.ask([p[2] for p in probes])]) \
        if probes else []
    answers = [r.get("raw_answer", r["answer"]) for r in rows]  # what the memory said, before any threshold
    hits = [float(contains_reference(a, p[3])) for p, a in zip(probes, answers)]
    seen = [normalize_answer(p[2]) in (trained or set()) for p in probes]
    # what the misses are: an abstention is honest, an echo of the question misleads the executive
    misses = [(p, a) for p, a, h in zip(probes, answers, hits) if not h]
    echoes = sum(adds_nothing(p[2], a) for p, a in misses)
    idks = sum(is_idk(a) for _, a in misses)
    by_hop: dict[str, list[float]] = {}
    for p, h in zip(probes, hits):
        by_hop.setdefault(f"hop{p[1]}", []).append(h)
    unseen = [h for h, v in zip(hits, seen) if not v]
    conf = [r.get("confidence") for r in rows]
    return {"probes": len(probes), "recall": round(sum(hits) / max(1, len(hits)), 4),
            "recall_ci": bootstrap_ci(hits) if hits else None, "seen_verbatim": sum(seen),
            "recall_unseen": round(sum(unseen) / max(1, len(unseen)), 4),
            "recall_unseen_ci": bootstrap_ci(unseen) if unseen else None,
            "confidence": confidence_report(conf, hits, getattr(memory, "abstain_threshold", None)),
            "by_hop": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_hop.items())},
            "misses": {"echo": round(echoes / max(1, len(probes)), 4), "idk": round(idks / max(1, len(probes)), 4),
                       "wrong": round((len(misses) - echoes - idks) / max(1, len(probes)), 4)},
            "rows": [{"qid": p[0], "hop": p[1], "question": p[2], "gold": p[3][0], "answer": a, "hit": bool(h),
                      "confidence": c, "seen_verbatim": v} for p, a, h, c, v in zip(probes, answers, hits, conf, seen)]}


def confidence_report(conf: list, hits: list[float], threshold: float | None) -> dict | None:
    """How well the memory's confidence tells its right answers from its wrong ones on these probes:
    AUROC, and at the version's calibrated threshold the share kept and the accuracy among them."""
    from memo.training.calibration import auroc, selective

    pairs = [(c, bool(h)) for c, h in zip(conf, hits) if c is not None]
    if not pairs:
        return None
    scores, labels = [c for c, _ in pairs], [y for _, y in pairs]
    out = {"auroc": auroc(scores, labels), "threshold": threshold}
    if threshold is not None:
        out.update(selective(scores, labels, threshold))
    return out


def reflections_recited(reflections, memory, sample: int = 60) -> dict:
    """The memory asked a sample of its own training questions, verbatim: does its answer contain the
    reflection's answer (normalised)? What training achieved."""
    rows = list(reflections[["question", "answer"]].itertuples(index=False))
    rows = random.Random(0).sample(rows, min(sample, len(rows)))
    answers = memory.ask([r.question for r in rows]) if rows else []
    hits = [float(contains_reference(a, [r.answer])) for r, a in zip(rows, answers)]
    return {"asked": len(rows), "recited": round(sum(hits) / max(1, len(hits)), 4)}


def diagnose(questions: list[Question], memory, reflections=None) -> dict:
    trained = {normalize_answer(q) for q in reflections["question"]} if reflections is not None else None
    out = {"memory_recall": memory_recall(questions, memory, trained)}
    if reflections is not None and len(reflections):
        out["reflections_recited"] = reflections_recited(reflections, memory)
        out["reflection_coverage"] = reflection_coverage(reflections, questions)
    return out
