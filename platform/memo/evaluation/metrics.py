"""What a benchmark run measures besides EM/F1 (memo.text): how much of what the benchmark needs the
reflections state, the paper's binary correctness judgement by an LLM judge, and the uncertainty of
a mean over a few questions (bootstrap intervals)."""

from __future__ import annotations

from memo.evaluation.benchmarks import Question
from memo.text import normalize_answer


def reflection_coverage(reflections, questions: list[Question]) -> dict:
    """How much of what the benchmark needs the reflections state: the share of gold facts whose answer
    (normalised) appears in at least one reflection answer. MuSiQue: each `question_decomposition[].answer`
    (per hop); other benchmarks: the final answer or one of its aliases."""
    answers = " \n ".join(normalize_answer(a) for a in reflections["answer"])
    hop, by_hop = [], {}
    for q in questions:
        facts = [d.get("answer", "") for d in q.decomposition] or [q.answer]
        for i, fact in enumerate(facts):
            refs = [fact] + (q.aliases if not q.decomposition or i == len(facts) - 1 else [])
            hit = any(normalize_answer(r) and f" {normalize_answer(r)} " in f" {answers} " for r in refs)
            hop.append(hit)
            by_hop.setdefault(f"hop{i + 1}", []).append(hit)
    return {"facts": len(hop), "covered": int(sum(hop)), "coverage": round(sum(hop) / max(1, len(hop)), 3),
            "by_hop": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_hop.items())},
            "reflections": len(reflections)}


def judge_correct(judge, question: str, references: list[str], prediction: str) -> float:
    """LLM-judge correctness (the paper's accuracy): 1.0 for a "yes", 0.0 otherwise."""
    prompt = (f"Question: {question}\nReference answer(s): {' | '.join(references)}\nProposed answer: {prediction}\n"
              "Does the proposed answer give the same answer as a reference (extra detail is fine)? "
              "Reply yes or no.")
    out = judge.complete([{"role": "user", "content": prompt}], max_tokens=4, temperature=0.0)
    return float(out.strip().lower().startswith("yes"))


def bootstrap_ci(values: list[float], confidence: float = 0.95, resamples: int = 2000) -> list[float]:
    """The percentile bootstrap interval of the mean over questions (scipy.stats.bootstrap, seeded so a
    re-run reports the same interval). A handful of questions gives a wide interval: that is the point."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.all(data == data[0]):  # no spread to resample (scipy would warn and return nan)
        m = float(data.mean()) if len(data) else float("nan")
        return [round(m, 4), round(m, 4)]
    res = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(0))
    return [round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4)]
