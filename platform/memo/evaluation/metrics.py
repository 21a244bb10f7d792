"""What a benchmark run measures besides EM/F1 (memo.text): how much of what the benchmark needs the
reflections state, and the paper's binary correctness judgement by an LLM judge."""

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
