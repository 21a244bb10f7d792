"""The single protocol: the executive decomposes the question once, the memory answers every
sub-question (and the question itself), the executive answers from the non-IDK answers.

A sub-question that needs an earlier one's answer says so with "#k" (the MuSiQue convention): it is
asked after sub-question k, with k's answer (the entity it names) put in, so hop 2 asks about what hop 1
found instead of a description the memory never saw ("Who employed #1?" -> "Who employed Ernst Mach?").
A 1.5B executive writes "#k" in about 1 of 12 MuSiQue decompositions and otherwise asks hop 2 about the
description ("What team did Anna Benson's husband play for?"), so `chain=rewrite` has it rewrite every
later sub-question with the answers found so far, one short call per hop.
"""

from __future__ import annotations

import re
import time

from memo.config import ExecutiveConfig
from memo.executive.guard import final_answer
from memo.executive.trace import Meter, Trace, ask_and_record
from memo.text import IDK_ANSWER, is_idk, short_answer


def parse_subquestions(text: str, limit: int) -> list[str]:
    """Tolerant parsing of the executive's decomposition: numbered, bulleted or JSON-list lines all
    work, because whatever the format, a sub-question is a run of words ending in "?"."""
    out: list[str] = []
    for m in re.finditer(r'[A-Za-z][^?\n"\[\]]*\?', text):
        # A small model often echoes the prompt's "Question: ..." label: the label is not part of it.
        q = re.sub(r"^(?:Question|Q)\s*:\s*", "", m.group().strip())
        if len(q) >= 8 and q not in out:
            out.append(q)
    return out[:limit]


DECOMPOSE = ("Split the question into at most {n} short, simple questions that each ask for one fact, in the "
             "order they must be answered. When a question needs the answer to an earlier one, write #1, #2, ... "
             "in its place (for example: 1. Who founded the company? 2. Where was #1 born?). Write one question "
             "per line and nothing else.\n\nQuestion: {q}")
_REF = re.compile(r"#(\d+)")
ANSWER = ("Facts:\n{facts}\n\nUsing only these facts, answer the question in a few words.\n"
          "Question: {q}\nAnswer:")
# grounding=open: the memory's answers can be wrong or about something else; the executive keeps its own knowledge
ANSWER_OPEN = ("Notes from a memory of the user's documents (they may be incomplete, or about something else):\n"
               "{facts}\n\nAnswer the question in a few words. Use the notes where they answer it, and what "
               "you know otherwise.\nQuestion: {q}\nAnswer:")
CLOSED_BOOK = "Answer the question in a few words.\nQuestion: {q}\nAnswer:"
REWRITE = ("Facts found so far:\n{facts}\n\nRewrite the next question so that it names the person, place or thing "
           "these facts found instead of describing it. If the facts do not help, repeat it unchanged. Write only "
           "the question.\nNext question: {q}\nRewritten question:")


def single_turn(question: str, executive, memory, cfg=None,
                max_subquestions: int | None = None) -> Trace:
    """Decompose once, ask the memory everything, answer from the non-IDK answers."""
    cfg = cfg or ExecutiveConfig()
    n = max_subquestions or cfg.max_subquestions
    t0, meter = time.time(), Meter(executive, memory)
    tr = Trace(question, "single")
    messages = [{"role": "user", "content": DECOMPOSE.format(n=n, q=question)}]
    plan = executive.complete(messages, max_tokens=cfg.executive_max_tokens, temperature=cfg.temperature)
    subs = parse_subquestions(plan, n)
    tr.steps.append({"role": "executive", "step": "decompose", "messages": messages, "output": plan, "parsed": subs})
    # The user's own question goes to the memory too: a weak executive's decomposition may lose the
    # point, and the memory was trained on composite (cross-document) questions as well.
    subs = [q for q in subs if q.lower() != question.lower()]
    answers = (ask_rewritten(tr, executive, memory, question, subs, cfg) if cfg.chain == "rewrite"
               else ask_chained(tr, memory, question, subs))
    facts = [a for a in answers if not is_idk(a)]
    if not facts and cfg.grounding != "open":
        tr.answer = IDK_ANSWER
    else:
        prompt = ANSWER_OPEN if cfg.grounding == "open" else ANSWER
        if facts:
            content = prompt.format(facts="\n".join(f"- {f}" for f in dict.fromkeys(facts)), q=question)
        else:  # open, and the memory knows nothing: the executive alone
            content = CLOSED_BOOK.format(q=question)
        messages = [{"role": "user", "content": content}]
        out = executive.complete(messages, max_tokens=48, temperature=cfg.final_temperature)
        tr.steps.append({"role": "executive", "step": "answer", "messages": messages, "output": out})
        tr.answer = final_answer(tr, cfg.grounding, question, out, facts,
                                 answers[0] if not is_idk(answers[0]) else "")
    return meter.close(tr, t0)


def ask_chained(tr: Trace, memory, question: str, subs: list[str]) -> list[str]:
    """The question and every sub-question without a "#k" in one memory round; then each chained one in
    order, with the answers it refers to put in (skipped, and traced, when one of them is unknown)."""
    free = [i for i, q in enumerate(subs) if not _REF.search(q)]
    first = ask_and_record(tr, memory, [question] + [subs[i] for i in free])
    found = {i: (subs[i], a) for i, a in zip(free, first[1:])}  # index -> (the question as asked, its answer)
    for i, q in enumerate(subs):
        if i not in found:
            asked = _REF.sub(lambda m: _filled(found, int(m.group(1)) - 1, m.group()), q)
            found[i] = (asked, _skipped(tr, q) if _REF.search(asked)
                        else ask_and_record(tr, memory, [asked], chained_from=q)[0])
    return first[:1] + [found[i][1] for i in range(len(subs))]


def ask_rewritten(tr: Trace, executive, memory, question: str, subs: list[str], cfg) -> list[str]:
    """The question and the first sub-question in one memory round; then each later sub-question in
    order, rewritten by the executive with the facts found so far (a "#k" is filled in first). The
    original stays when the rewrite is not one question, or when nothing is known yet."""
    if not subs:
        return ask_and_record(tr, memory, [question])
    answers = ask_and_record(tr, memory, [question, subs[0]])
    found = {0: (subs[0], answers[1])}  # sub-question index -> (the question as asked, the memory's answer)
    for i, q in enumerate(subs[1:], start=1):
        asked = _REF.sub(lambda m: _filled(found, int(m.group(1)) - 1, m.group()), q)
        facts = [a for _, a in found.values() if not is_idk(a)]
        if facts:
            content = REWRITE.format(facts="\n".join(f"- {f}" for f in dict.fromkeys(facts)), q=asked)
            messages = [{"role": "user", "content": content}]
            out = executive.complete(messages, max_tokens=48, temperature=cfg.temperature)
            parsed = parse_subquestions(out, 1)
            tr.steps.append({"role": "executive", "step": "rewrite", "messages": messages, "output": out,
                             "parsed": parsed})
            asked = parsed[0] if parsed else asked
        if _REF.search(asked):  # it still needs an answer the memory did not give
            found[i] = (asked, _skipped(tr, q))
        else:
            found[i] = (asked, ask_and_record(tr, memory, [asked], chained_from=q)[0])
        answers.append(found[i][1])
    return answers


def _skipped(tr: Trace, q: str) -> str:
    tr.steps.append({"role": "executive", "step": "skip", "question": q,
                     "why": "it needs the answer to a sub-question the memory did not answer"})
    return IDK_ANSWER


def _filled(found: dict, k: int, ref: str) -> str:
    """"#k" -> the entity sub-question k's answer names; the reference stays when k is unknown."""
    if k not in found or is_idk(found[k][1]):
        return ref
    return short_answer(*found[k])


def closed_book(question: str, executive, max_tokens: int = 48) -> str:
    return executive.complete([{"role": "user", "content": CLOSED_BOOK.format(q=question)}], max_tokens=max_tokens)
