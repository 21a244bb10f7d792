"""The paper's structured multi-turn protocol: grounding (one question per clue, phrasings, a
combination), entity pinning (ranked candidates, known facts, dead ends, simplified retries, demotion),
answer seeking (every question names the pinned entity, pivots allowed), final synthesis.

Each executive turn returns a small JSON state, parsed tolerantly (memo.llm_json); one re-ask follows an
unparseable reply, and a reply that still does not parse falls back to what the memory's answers say
(names they mention become candidates), so a weak executive slows the protocol down but never breaks it.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from memo.config import ExecutiveConfig
from memo.executive.guard import adds_a_fact, final_answer
from memo.executive.single import CLOSED_BOOK, parse_subquestions
from memo.executive.trace import Meter, Trace, ask_and_record
from memo.llm_json import parse_json
from memo.text import IDK_ANSWER, find_spans, is_idk


def _strings(value, limit: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value if isinstance(value, list) else []:
        if isinstance(v, dict):  # {"name": ..} or {"question": ..}
            v = v.get("name") or v.get("question") or v.get("text") or ""
        if isinstance(v, str) and v.strip() and v.strip() not in out:
            out.append(v.strip())
    return out[:limit]


def ask_json(tr: Trace, executive, phase: str, turn: int, prompt: str, example: str, cfg,
             temperature: float) -> dict:
    """One executive turn: the prompt, the reply, the parsed object (or {} and "failed")."""
    messages = [{"role": "user", "content": prompt}]
    for attempt in range(cfg.json_retries + 1):
        out = executive.complete(messages, max_tokens=cfg.executive_max_tokens, temperature=temperature,
                                 json_mode=True)
        obj, how = parse_json(out)
        tr.steps.append({"role": "executive", "phase": phase, "turn": turn, "attempt": attempt,
                         "messages": messages, "output": out, "parse": how, "parsed": obj})
        if obj is not None:
            return obj
        messages = messages + [{"role": "assistant", "content": out},
                               {"role": "user", "content": f"Reply with one JSON object only, like {example}"}]
    return {}


@dataclass
class _Candidate:
    name: str
    support: int = 0     # non-IDK memory answers that mention it
    rank_bonus: int = 0  # the executive listed it (earlier = more)
    idk: int = 0

    @property
    def score(self) -> int:
        return self.support * 2 + self.rank_bonus


class _State:
    """What the executive knows: candidates, facts, dead ends. Rendered into every prompt."""

    def __init__(self, question: str, cfg):
        self.question, self.cfg = question, cfg
        self.candidates: dict[str, _Candidate] = {}
        self.facts: list[tuple[str, str]] = []
        self.idk: Counter = Counter()
        self.asked: Counter = Counter()
        self.pinned: str | None = None

    @property
    def dead_ends(self) -> list[str]:
        return [q for q, n in self.idk.items() if n >= self.cfg.idk_dead_end]

    def ranked(self, include_demoted: bool = True) -> list[_Candidate]:
        live = [c for c in self.candidates.values() if c.idk <= self.cfg.demote_after]
        active = sorted((c for c in live if c.idk < self.cfg.demote_after), key=lambda c: -c.score)
        demoted = sorted((c for c in live if c.idk >= self.cfg.demote_after), key=lambda c: -c.score)
        return active + (demoted if include_demoted else [])

    def add_candidates(self, names: list[str], bonus: bool = False) -> None:
        q = self.question.lower()
        for i, name in enumerate(names):
            if len(name) < 2 or name.lower() in q:
                continue
            c = self.candidates.setdefault(name, _Candidate(name))
            if bonus:
                c.rank_bonus = max(c.rank_bonus, len(names) - i)

    def record(self, questions: list[str], answers: list[str]) -> None:
        for q, a in zip(questions, answers):
            self.asked[q.lower()] += 1
            named = [c for c in self.candidates.values() if c.name.lower() in q.lower()]
            if is_idk(a):
                self.idk[q] += 1
                for c in named:  # demote after demote_after IDKs, drop one later (see ranked)
                    c.idk += 1
                continue
            self.facts.append((q, a))
            self.add_candidates([sp["text"] for sp in find_spans(a) if sp["kind"] == "name"
                                 and sp["text"].lower() not in q.lower()])
            for c in self.candidates.values():
                if c.name.lower() in a.lower():
                    c.support += 1

    def fresh(self, questions: list[str]) -> list[str]:
        """Questions worth asking: not a dead end, not asked before."""
        out = []
        for q in questions:
            if q not in self.dead_ends and self.asked[q.lower()] == 0 and q not in out:
                out.append(q)
        return out[:self.cfg.questions_per_turn]

    def failed(self) -> list[str]:
        return [q for q, n in self.idk.items() if 0 < n < self.cfg.idk_dead_end]

    def render(self) -> str:
        facts = "\n".join(f"- Q: {q} A: {a}" for q, a in self.facts[-12:]) or "- (none yet)"
        cands = ", ".join(f"{c.name} ({c.support} supporting answers)" for c in self.ranked()[:6]) or "(none yet)"
        failed = "\n".join(f"- {q}" for q in self.failed()[-4:]) or "- (none)"
        dead = "\n".join(f"- {q}" for q in self.dead_ends[-4:]) or "- (none)"
        return (f"Question: {self.question}\nKnown facts:\n{facts}\nCandidates: {cands}\n"
                f"Questions that got I don't know (simplify them by dropping a detail):\n{failed}\n"
                f"Dead ends (do not ask again):\n{dead}")

    def snapshot(self, phase: str, turn: int) -> dict:
        return {"role": "state", "phase": phase, "turn": turn, "pinned": self.pinned,
                "candidates": [{"name": c.name, "support": c.support, "idk": c.idk} for c in self.ranked()[:8]],
                "facts": len(self.facts), "dead_ends": self.dead_ends}


MEMORY_INTRO = ("You answer a question by asking a memory model. It knows facts but sees only one short "
                "question at a time, with no context, and may answer \"I don't know\".\n")
GROUNDING = MEMORY_INTRO + (
    "Question: {q}\nSplit the question into its clues (facts about the thing asked for). Write one short "
    "question per clue; for the most specific clue, write {k} different phrasings; add one question that "
    "combines two clues. Reply with JSON only: "
    '{{"clues": ["..."], "questions": ["..."]}}')
GROUNDING_EXAMPLE = '{"clues": ["..."], "questions": ["...?"]}'
PINNING = MEMORY_INTRO + (
    "{state}\nWhich entity do the clues point to? Rank the candidates, say which one is confirmed (or null), "
    "and ask up to {n} new open questions to confirm it. Reply with JSON only: "
    '{{"candidates": ["best", "second"], "confirmed": null, "questions": ["..."]}}')
PINNING_EXAMPLE = '{"candidates": ["..."], "confirmed": null, "questions": ["...?"]}'
SEEKING = MEMORY_INTRO + (
    "{state}\nThe question is about {entity}. Ask up to {n} questions that each name {entity}, or answer if "
    "the facts suffice, or pivot to another candidate. Reply with JSON only: "
    '{{"questions": ["..."], "answer": null, "pivot": null}}')
SEEKING_EXAMPLE = '{"questions": ["...?"], "answer": null, "pivot": null}'
FINAL = (
    "{state}\nAnswer the question in a few words, choosing the candidate that satisfies the most clues. "
    'Reply with JSON only: {{"candidate": "...", "answer": "..."}}')
FINAL_EXAMPLE = '{"candidate": "...", "answer": "..."}'


def _simplify(question: str) -> str | None:
    """Drop one detail from a question that got IDK: the last clause or prepositional phrase."""
    body = question.rstrip("?").strip()
    for pat in (r",[^,]*$", r"\s+(?:who|which|that|where|when)\s+[^,]*$", r"\s+(?:in|on|at|during|for|from)\s+[^\s].*$"):
        shorter = re.sub(pat, "", body, count=1)
        if shorter != body and len(shorter.split()) >= 3:
            return shorter + "?"
    return None


def structured(question: str, executive, memory, cfg=None) -> Trace:
    """The paper's structured multi-turn protocol: grounding, entity pinning, answer seeking, synthesis."""
    cfg = cfg or ExecutiveConfig()
    t0, meter = time.time(), Meter(executive, memory)
    tr, st = Trace(question, "structured"), _State(question, cfg)
    n = cfg.questions_per_turn

    def ask(questions: list[str], phase: str, turn: int) -> None:
        answers = ask_and_record(tr, memory, questions, phase=phase, turn=turn)
        st.record(questions, answers)
        tr.steps.append(st.snapshot(phase, turn))

    # 1. Grounding: the question itself, one question per clue, phrasings, a combination.
    js = ask_json(tr, executive, "grounding", 0, GROUNDING.format(q=question, k=cfg.grounding_phrasings),
                  GROUNDING_EXAMPLE, cfg, cfg.temperature)
    clues = _strings(js.get("questions"), 2 * n + cfg.grounding_phrasings) or parse_subquestions(
        tr.steps[-1]["output"], n)
    ask([question] + [q for q in clues if q.lower() != question.lower()], "grounding", 0)

    # 2. Entity pinning: ranked candidates, simplified retries, demotion, stop when confirmed.
    for turn in range(1, cfg.pinning_turns + 1):
        js = ask_json(tr, executive, "pinning", turn, PINNING.format(state=st.render(), n=n), PINNING_EXAMPLE,
                      cfg, cfg.temperature)
        st.add_candidates(_strings(js.get("candidates"), 6), bonus=True)
        confirmed = js.get("confirmed") if isinstance(js.get("confirmed"), str) else None
        top = st.ranked(include_demoted=False)
        if confirmed and confirmed in st.candidates and st.candidates[confirmed].support > 0:
            st.pinned = confirmed
        elif top and top[0].support >= 2 and (len(top) == 1 or top[0].support > top[1].support):
            st.pinned = top[0].name  # two independent answers agree and nothing else is as well supported
        if st.pinned:
            tr.steps.append(st.snapshot("pinning", turn))
            break
        questions = st.fresh(_strings(js.get("questions"), n) +
                             [s for s in map(_simplify, st.failed()) if s])
        if not questions:  # angles exhausted
            break
        ask(questions, "pinning", turn)
    if not st.pinned and st.ranked(include_demoted=False):
        st.pinned = st.ranked(include_demoted=False)[0].name

    # 3. Answer seeking: every question names the pinned entity; pivots allowed; stop on an answer.
    proposed = None
    for turn in range(1, cfg.seeking_turns + 1 if st.pinned else 0):
        js = ask_json(tr, executive, "seeking", turn, SEEKING.format(state=st.render(), entity=st.pinned, n=n),
                      SEEKING_EXAMPLE, cfg, cfg.seeking_temperature)
        pivot = js.get("pivot") if isinstance(js.get("pivot"), str) else None
        if pivot and pivot in st.candidates and pivot != st.pinned:
            tr.steps.append({"role": "executive", "phase": "seeking", "turn": turn, "pivot": pivot})
            st.pinned = pivot
        answer = js.get("answer") if isinstance(js.get("answer"), str) else None
        if answer and adds_a_fact(answer, question, [a for _, a in st.facts]):
            proposed = answer
            break
        named = [q for q in _strings(js.get("questions"), n) if st.pinned.lower() in q.lower()]
        questions = st.fresh(named or [f"What is known about {st.pinned}?", f"{question} ({st.pinned})"])
        if not questions:
            break
        ask(questions, "seeking", turn)

    # 4. Final synthesis over every non-IDK answer.
    facts = [a for _, a in st.facts]
    if not facts:
        tr.answer = IDK_ANSWER
        if cfg.grounding == "open":  # the memory knows nothing: the executive answers alone
            messages = [{"role": "user", "content": CLOSED_BOOK.format(q=question)}]
            out = executive.complete(messages, max_tokens=48, temperature=cfg.final_temperature)
            tr.steps.append({"role": "executive", "step": "answer", "messages": messages, "output": out})
            tr.answer = out.strip() or IDK_ANSWER
        return meter.close(tr, t0)
    js = ask_json(tr, executive, "final", 0, FINAL.format(state=st.render()), FINAL_EXAMPLE, cfg,
                  cfg.final_temperature)
    out = js.get("answer") if isinstance(js.get("answer"), str) else (proposed or "")
    direct = next((a for q, a in st.facts if q == question), "")
    tr.answer = final_answer(tr, cfg.grounding, question, out or proposed or "", facts, direct)
    return meter.close(tr, t0)
