"""The memory's abstention threshold: below it, an answer counts as "I don't know".

A small fine-tuned model answers questions it does not know the way its training answered the ones it
did (Kang et al. 2024): confidently, in a training sentence's shape. Its token log-probabilities still
tell some of those apart (the reply's confidence, `engines.base.confidence`). After training, the memory
is asked questions it was never trained on verbatim: the held-out rewordings of trained facts (right or
wrong by the reference) and the same questions about an invented entity (any answer but "I don't know"
is wrong). The threshold is the confidence that best separates right from wrong answers on them; it is
stored with the version (manifest metrics, registry tag `memo.abstain_threshold`), returned with served
raw answers, and applied by a local memory client with `executive.confidence_gate` (`executive.clients`),
whose trace keeps the raw answer and its confidence.
"""

from __future__ import annotations

import logging

from memo.synthesis.abstain import with_invented_name
from memo.text import contains_reference, is_idk

log = logging.getLogger(__name__)


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve of `scores` for telling True from False labels (ties count half); None
    without both kinds."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 4)


def choose_threshold(scores: list[float], labels: list[bool]) -> float:
    """The confidence t that decides best: answers >= t kept, below it abstained; counts right answers
    kept plus wrong ones abstained. 0.0 (keep everything) unless abstaining gains something."""
    best_t, best = 0.0, sum(labels)
    for t in sorted(set(scores)):
        good = sum((s >= t) == y for s, y in zip(scores, labels))
        if good > best:
            best_t, best = t, good
    return best_t


def selective(scores: list[float], labels: list[bool], t: float) -> dict:
    kept = [y for s, y in zip(scores, labels) if s >= t]
    return {"coverage": round(len(kept) / max(1, len(labels)), 4),
            "selective_accuracy": round(sum(kept) / len(kept), 4) if kept else None,
            "accuracy_all": round(sum(labels) / max(1, len(labels)), 4)}


def calibrate(memory, heldout: list[dict], corpus_text: str, max_new_tokens: int = 48) -> dict:
    """Ask the held-out rewordings and their invented-entity twins; return the threshold and how well
    confidence tells right from wrong (AUROC, selective accuracy and coverage at the threshold)."""
    if not heldout:
        return {}
    twins = [q for q in (with_invented_name(r["question"], corpus_text, salt="calibration") for r in heldout) if q]
    questions = [r["question"] for r in heldout] + twins
    replies = memory.ask(questions, max_new_tokens)
    scores, labels = [], []
    for k, r in enumerate(replies):
        if r.confidence is None or is_idk(r.text):
            continue  # an abstention is already "I don't know"; an engine without log-probabilities: nothing to learn
        right = k < len(heldout) and contains_reference(r.text, [heldout[k]["answer"], *heldout[k].get("aliases", [])])
        scores.append(r.confidence)
        labels.append(right)
    if not scores:
        return {}
    if all(labels) or not any(labels):  # a threshold learnt from one kind of answer only says nothing
        log.info(f"[train] no abstention threshold: the {len(scores)} calibration answers were all "
                 f"{'right' if all(labels) else 'wrong'}")
        return {"abstain_threshold": None, "calibration_n": len(scores),
                "calibration_accuracy_all": round(sum(labels) / len(labels), 4)}
    t = choose_threshold(scores, labels)
    out = {"abstain_threshold": t, "confidence_auroc": auroc(scores, labels), "calibration_n": len(scores),
           **{f"calibration_{k}": v for k, v in selective(scores, labels, t).items()}}
    log.info(f"[train] abstention threshold {t:.3f} on {len(scores)} answers ({len(heldout)} held-out rewordings, "
             f"{len(twins)} about invented entities): AUROC {out['confidence_auroc']}, keeps "
             f"{out['calibration_coverage']:.0%} of answers")
    return out
