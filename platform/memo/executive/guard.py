"""The executive's grounding guard: an answer must carry a fact from the memory's answers, and must not
drop what the memory said to the user's own question; otherwise the memory's answer stands (traced).

`grounding=strict` applies it. It protects a weak executive's answer ("The lab is led by the head of the
lab") but hands the user the memory's raw sentence whenever the executive's answer names nothing the
memory said, which is also what happens when the memory is wrong: on the MuSiQue --preset cpu run it
replaced 19 of 24 answers. `facts` lets the executive's answer stand, `open` also lets the executive
use what it knows itself (memo.executive.single, memo.executive.structured)."""

from __future__ import annotations

from memo.executive.trace import Trace
from memo.text import find_spans


def dropped_facts(answer: str, question: str, direct: str) -> list[str]:
    """Names, numbers and dates the memory gave for the user's own question (and the question does not
    name) that the executive's answer leaves out."""
    a, q = answer.lower(), question.lower()
    return [sp["text"] for sp in find_spans(direct) if sp["text"].lower() not in q and sp["text"].lower() not in a]


def adds_a_fact(answer: str, question: str, facts: list[str]) -> bool:
    """True when the answer names something (a name, number or date) that the memory's answers name
    and the question does not: the minimum an answer grounded in the memory must do."""
    if not answer.strip():
        return False
    fact_text, q = " ".join(facts).lower(), question.lower()
    return any(sp["text"].lower() in fact_text and sp["text"].lower() not in q for sp in find_spans(answer))


def guarded_answer(tr: Trace, question: str, out: str, facts: list[str], direct: str) -> str:
    """The executive's answer unless it carries no fact from the memory (empty, or naming nothing the
    question did not already name) or drops part of the memory's answer to the user's own question: a
    weak executive does both ("The lab is led by the head of the lab"). The trace says why."""
    answer = out.strip()
    lost = dropped_facts(answer, question, direct) if direct else []
    if not adds_a_fact(answer, question, facts):
        tr.steps.append({"role": "executive", "step": "fallback", "output": facts[0],
                         "why": "the executive's answer named no name, number or date from the memory's answers"})
        return facts[0]
    if lost:
        tr.steps.append({"role": "executive", "step": "fallback", "output": direct,
                         "why": f"the executive's answer dropped {', '.join(lost)} from the memory's answer "
                                "to the question"})
        return direct
    return answer


def final_answer(tr: Trace, grounding: str, question: str, out: str, facts: list[str], direct: str) -> str:
    """The answer the user gets, by `grounding`: strict = guarded; facts and open = the executive's own
    (the memory's first fact only when the executive said nothing)."""
    if grounding == "strict":
        return guarded_answer(tr, question, out, facts, direct)
    answer = out.strip()
    if not answer and facts:
        tr.steps.append({"role": "executive", "step": "fallback", "output": facts[0],
                         "why": "the executive gave no answer"})
        return facts[0]
    return answer
