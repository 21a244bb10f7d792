"""The EXECUTIVE side: any chat LLM questions the memory and answers the user.

Two protocols, as in the paper:
  single      the executive decomposes the question once, the memory answers every sub-question, the
              executive answers from those answers;
  structured  grounding (one question per clue, phrasings, combinations), entity pinning (ranked
              candidates, known facts, dead ends, simplified retries, demotion), answer seeking (every
              question names the pinned entity, pivots allowed), final synthesis.
Each memory call is a fresh single-turn chat: the executive never sees documents, and the memory never
sees the conversation. Every run returns a Trace: each message, the parsed state per turn, and the
calls and tokens spent on both sides.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memo.errors import MemoError
from memo.reflections import IDK_ANSWER


class ChatLLM(Protocol):
    """An executive: `usage` counts calls and tokens so every trace can report its cost."""
    usage: Counter

    def complete(self, messages: list[dict], max_tokens: int = 96, temperature: float = 0.0) -> str: ...


class MemoryClient(Protocol):
    usage: Counter

    def ask(self, questions: list[str]) -> list[str]: ...


class LocalLLM:
    """A transformers chat model in this process (the offline default executive)."""

    def __init__(self, spec: str):
        from memo.models import load_model

        self.model, self.tok = load_model(spec)
        self.usage: Counter = Counter()

    def complete(self, messages, max_tokens=96, temperature=0.0):
        from memo.memory import generate, prompt_ids

        out = generate(self.model, self.tok, [messages], max_tokens, temperature)[0]
        self.usage.update(calls=1, prompt_tokens=len(prompt_ids(self.tok, messages)),
                          completion_tokens=len(self.tok(out, add_special_tokens=False)["input_ids"]))
        return out


class OpenAILLM:
    """Any OpenAI-compatible endpoint (vLLM, a hosted API, or this project's own router)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        import logging

        from openai import OpenAI

        # httpx logs every request at INFO, and Ray Serve's start-up resets logger levels: set it here.
        logging.getLogger("httpx").setLevel(logging.WARNING)

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model = model
        self.last_version: str | None = None
        self.usage: Counter = Counter()

    def complete(self, messages, max_tokens=96, temperature=0.0):
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        self.last_version = raw.headers.get("x-memo-model-version")
        resp = raw.parse()
        u = getattr(resp, "usage", None)
        self.usage.update(calls=1, prompt_tokens=getattr(u, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(u, "completion_tokens", 0) or 0)
        return (resp.choices[0].message.content or "").strip()


class HttpMemory:
    """The memory behind the Serve router: one fresh single-turn chat per question."""

    def __init__(self, base_url: str, domain: str, api_key: str | None = None, max_tokens: int = 64,
                 temperature: float = 0.0):
        self.llm = OpenAILLM(base_url.rstrip("/") + "/v1", domain, api_key)
        self.max_tokens, self.temperature = max_tokens, temperature

    @property
    def version(self) -> str | None:
        return self.llm.last_version

    @property
    def usage(self) -> Counter:
        return self.llm.usage

    def ask(self, questions):
        return [self.llm.complete([{"role": "user", "content": q}], self.max_tokens, self.temperature)
                for q in questions]


def load_memory(spec: str, max_tokens: int = 64, temperature: float = 0.0) -> "LocalMemory":
    """A memory in this process from models:/memo-X@alias, models:/memo-X/N, a model folder or a base
    model alias (smollm2-135m); its `version` says which one answered."""
    from memo import registry

    if spec.startswith("models:/"):
        domain, alias, version = registry.parse_model_uri(spec)
        version = version or registry.resolve_version(domain, alias)
        mem = LocalMemory(str(registry.download_version(domain, version)), max_tokens, temperature)
        mem.version = f"models:/{registry.registered_name(domain)}/{version}"
        return mem
    if not Path(spec).is_dir():
        from memo.models import resolve_base_model

        try:
            spec = resolve_base_model(spec)
        except MemoError:
            raise MemoError(f"--memory {spec}: not a models:/ URI, a model folder or a known base model") from None
    mem = LocalMemory(spec, max_tokens, temperature)
    mem.version = spec
    return mem


class LocalMemory:
    """A memory model folder loaded in this process (tests, offline evaluation)."""

    def __init__(self, path: str, max_tokens: int = 64, temperature: float = 0.0):
        from memo.models import load_model

        self.model, self.tok = load_model(path)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.version = None
        self.usage: Counter = Counter()

    def ask(self, questions):
        from memo.memory import ask_memory, memory_messages, prompt_ids

        answers = ask_memory(self.model, self.tok, questions, self.max_tokens, temperature=self.temperature)
        self.usage.update(calls=len(questions),
                          prompt_tokens=sum(len(prompt_ids(self.tok, memory_messages(q))) for q in questions),
                          completion_tokens=sum(len(self.tok(a, add_special_tokens=False)["input_ids"])
                                                for a in answers))
        return answers


def is_idk(answer: str) -> bool:
    return bool(re.search(r"\b(i don'?t know|i do not know|unknown|not sure)\b", answer.lower())) or not answer.strip()


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


def dropped_facts(answer: str, question: str, direct: str) -> list[str]:
    """Names, numbers and dates the memory gave for the user's own question (and the question does not
    name) that the executive's answer leaves out."""
    from memo.reflections import find_spans

    a, q = answer.lower(), question.lower()
    return [sp["text"] for sp in find_spans(direct) if sp["text"].lower() not in q and sp["text"].lower() not in a]


def adds_a_fact(answer: str, question: str, facts: list[str]) -> bool:
    """True when the answer names something (a name, number or date) that the memory's answers name
    and the question does not: the minimum an answer grounded in the memory must do."""
    from memo.reflections import find_spans

    if not answer.strip():
        return False
    fact_text, q = " ".join(facts).lower(), question.lower()
    return any(sp["text"].lower() in fact_text and sp["text"].lower() not in q for sp in find_spans(answer))


DECOMPOSE = ("Split the question into at most {n} short, simple questions that each ask for one fact. "
             "Write one question per line and nothing else.\n\nQuestion: {q}")
ANSWER = ("Facts:\n{facts}\n\nUsing only these facts, answer the question in a few words.\n"
          "Question: {q}\nAnswer:")
CLOSED_BOOK = "Answer the question in a few words.\nQuestion: {q}\nAnswer:"


@dataclass
class Trace:
    """Everything the executive and the memory said, for debugging and evaluation."""
    question: str
    protocol: str = "single"
    steps: list[dict] = field(default_factory=list)
    memory_calls: int = 0
    memory_tokens: int = 0
    executive_calls: int = 0
    executive_tokens: int = 0
    answer: str = ""
    seconds: float = 0.0
    memory_version: str | None = None


def usage_of(client) -> tuple[int, int]:
    """(calls, tokens) a client has spent so far; (0, 0) for one that keeps no usage."""
    u = getattr(client, "usage", None) or {}
    return u.get("calls", 0), u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)


class _Meter:
    """Counts what one protocol run cost, as the difference of the clients' usage counters."""

    def __init__(self, executive, memory):
        self.executive, self.memory = executive, memory
        self.e0, self.m0 = usage_of(executive), usage_of(memory)

    def close(self, tr: Trace, t0: float) -> Trace:
        e, m = usage_of(self.executive), usage_of(self.memory)
        tr.executive_calls, tr.executive_tokens = e[0] - self.e0[0], e[1] - self.e0[1]
        tr.memory_tokens = m[1] - self.m0[1]
        # Scripted test doubles keep no usage: count the questions the trace shows.
        tr.memory_calls = (m[0] - self.m0[0]) or sum(1 for s in tr.steps if s["role"] == "memory")
        tr.memory_version = getattr(self.memory, "version", None)
        tr.seconds = round(time.time() - t0, 3)
        return tr


def _ask_memory(tr: Trace, memory, questions: list[str], **tags) -> list[str]:
    answers = memory.ask(questions) if questions else []
    tr.steps += [{"role": "memory", "question": q, "answer": a, **tags} for q, a in zip(questions, answers)]
    return answers


def _guarded_answer(tr: Trace, question: str, out: str, facts: list[str], direct: str) -> str:
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


def single_turn(question: str, executive: ChatLLM, memory: MemoryClient, cfg=None,
                max_subquestions: int | None = None) -> Trace:
    """Decompose once, ask the memory everything, answer from the non-IDK answers."""
    from memo.config import ExecutiveConfig

    cfg = cfg or ExecutiveConfig()
    n = max_subquestions or cfg.max_subquestions
    t0, meter = time.time(), _Meter(executive, memory)
    tr = Trace(question, "single")
    messages = [{"role": "user", "content": DECOMPOSE.format(n=n, q=question)}]
    plan = executive.complete(messages, max_tokens=cfg.executive_max_tokens, temperature=cfg.temperature)
    subs = parse_subquestions(plan, n)
    tr.steps.append({"role": "executive", "step": "decompose", "messages": messages, "output": plan, "parsed": subs})
    # The user's own question goes to the memory too: a weak executive's decomposition may lose the
    # point, and the memory was trained on composite (cross-document) questions as well.
    questions = [question] + [q for q in subs if q.lower() != question.lower()]
    answers = _ask_memory(tr, memory, questions)
    facts = [a for a in answers if not is_idk(a)]
    if not facts:
        tr.answer = IDK_ANSWER
    else:
        messages = [{"role": "user", "content": ANSWER.format(
            facts="\n".join(f"- {f}" for f in dict.fromkeys(facts)), q=question)}]
        out = executive.complete(messages, max_tokens=48, temperature=cfg.final_temperature)
        tr.steps.append({"role": "executive", "step": "answer", "messages": messages, "output": out})
        tr.answer = _guarded_answer(tr, question, out, facts, answers[0] if not is_idk(answers[0]) else "")
    return meter.close(tr, t0)


# ---------------------------------------------------------------------------------------------------
# Structured multi-turn protocol. Each executive turn returns a small JSON state; parsing is tolerant
# (fences, single quotes, trailing commas, unclosed brackets), one re-ask follows an unparseable reply,
# and a reply that still does not parse falls back to what the memory's answers say (names they
# mention become candidates), so a weak executive slows the protocol down but never breaks it.

def parse_json(text: str) -> tuple[dict | None, str]:
    """(object, how): how is "json", "repaired" or "failed"."""
    t = re.sub(r"```(?:json)?", "", text or "").strip()
    start = t.find("{")
    if start < 0:
        return None, "failed"
    body = t[start:]
    end = body.rfind("}")
    try:
        obj = json.loads(body[:end + 1]) if end >= 0 else None
        if isinstance(obj, dict):
            return obj, "json"
    except json.JSONDecodeError:
        pass
    fixed = body[:end + 1] if end >= 0 else body
    fixed = re.sub(r"\bNone\b", "null", re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", fixed)))
    if '"' not in fixed:
        fixed = fixed.replace("'", '"')
    fixed = re.sub(r",\s*([}\]])", r"\1", fixed)
    # Close what the reply left open (a reply cut by max_tokens): strings first, then brackets.
    if fixed.count('"') % 2:
        fixed += '"'
    stack = []
    for ch in re.sub(r'"(?:\\.|[^"\\])*"', "", fixed):
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    fixed = re.sub(r",\s*$", "", fixed) + "".join(reversed(stack))
    for candidate in (fixed, re.sub(r",\s*([}\]])", r"\1", fixed)):
        try:
            obj = json.loads(candidate)
            if isinstance(obj, dict):
                return obj, "repaired"
        except json.JSONDecodeError:
            continue
    return None, "failed"


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


def ask_json(tr: Trace, executive: ChatLLM, phase: str, turn: int, prompt: str, example: str, cfg,
             temperature: float) -> dict:
    """One executive turn: the prompt, the reply, the parsed object (or {} and "failed")."""
    messages = [{"role": "user", "content": prompt}]
    for attempt in range(cfg.json_retries + 1):
        out = executive.complete(messages, max_tokens=cfg.executive_max_tokens, temperature=temperature)
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
        from memo.reflections import find_spans

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


def structured(question: str, executive: ChatLLM, memory: MemoryClient, cfg=None) -> Trace:
    """The paper's structured multi-turn protocol: grounding, entity pinning, answer seeking, synthesis."""
    from memo.config import ExecutiveConfig

    cfg = cfg or ExecutiveConfig()
    t0, meter = time.time(), _Meter(executive, memory)
    tr, st = Trace(question, "structured"), _State(question, cfg)
    n = cfg.questions_per_turn

    def ask(questions: list[str], phase: str, turn: int) -> None:
        answers = _ask_memory(tr, memory, questions, phase=phase, turn=turn)
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
        return meter.close(tr, t0)
    js = ask_json(tr, executive, "final", 0, FINAL.format(state=st.render()), FINAL_EXAMPLE, cfg,
                  cfg.final_temperature)
    out = js.get("answer") if isinstance(js.get("answer"), str) else (proposed or "")
    direct = next((a for q, a in st.facts if q == question), "")
    tr.answer = _guarded_answer(tr, question, out or proposed or "", facts, direct)
    return meter.close(tr, t0)


def answer_question(question: str, executive: ChatLLM, memory: MemoryClient, cfg=None) -> Trace:
    """The protocol that `cfg.protocol` names."""
    from memo.config import ExecutiveConfig

    cfg = cfg or ExecutiveConfig()
    return (structured if cfg.protocol == "structured" else single_turn)(question, executive, memory, cfg)


def closed_book(question: str, executive: ChatLLM, max_tokens: int = 48) -> str:
    return executive.complete([{"role": "user", "content": CLOSED_BOOK.format(q=question)}], max_tokens=max_tokens)


def make_executive(url: str | None, model: str | None, api_key: str | None, local: str) -> ChatLLM:
    if url:
        if not model:
            raise MemoError("--executive-model is required with --executive-url (the model name the endpoint serves)")
        return OpenAILLM(url, model, api_key)
    return LocalLLM(local)
