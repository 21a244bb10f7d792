"""The EXECUTIVE side: any chat LLM questions the memory and answers the user.

Single-turn protocol (the paper's `single` mode): the executive decomposes the question once, the
memory answers every sub-question in a fresh single-turn chat, the executive answers from those
answers. The executive never sees documents, and the memory never sees the conversation.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from memo.errors import MemoError
from memo.reflections import IDK_ANSWER


class ChatLLM(Protocol):
    def complete(self, messages: list[dict], max_tokens: int = 96, temperature: float = 0.0) -> str: ...


class MemoryClient(Protocol):
    def ask(self, questions: list[str]) -> list[str]: ...


class LocalLLM:
    """A transformers chat model in this process (the offline default executive)."""

    def __init__(self, spec: str):
        from memo.models import load_model

        self.model, self.tok = load_model(spec)

    def complete(self, messages, max_tokens=96, temperature=0.0):
        from memo.memory import generate

        return generate(self.model, self.tok, [messages], max_tokens, temperature)[0]


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

    def complete(self, messages, max_tokens=96, temperature=0.0):
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        self.last_version = raw.headers.get("x-memo-model-version")
        return (raw.parse().choices[0].message.content or "").strip()


class HttpMemory:
    """The memory behind the Serve router: one fresh single-turn chat per question."""

    def __init__(self, base_url: str, domain: str, api_key: str | None = None, max_tokens: int = 64):
        self.llm = OpenAILLM(base_url.rstrip("/") + "/v1", domain, api_key)
        self.max_tokens = max_tokens

    @property
    def version(self) -> str | None:
        return self.llm.last_version

    def ask(self, questions):
        return [self.llm.complete([{"role": "user", "content": q}], self.max_tokens) for q in questions]


class LocalMemory:
    """A memory model folder loaded in this process (tests, offline evaluation)."""

    def __init__(self, path: str, max_tokens: int = 64):
        from memo.models import load_model

        self.model, self.tok = load_model(path)
        self.max_tokens = max_tokens
        self.version = None

    def ask(self, questions):
        from memo.memory import ask_memory

        return ask_memory(self.model, self.tok, questions, self.max_tokens)


def is_idk(answer: str) -> bool:
    return bool(re.search(r"\b(i don'?t know|i do not know|unknown|not sure)\b", answer.lower())) or not answer.strip()


def parse_subquestions(text: str, limit: int) -> list[str]:
    """Tolerant parsing of the executive's decomposition: numbered, bulleted or JSON-list lines all
    work, because whatever the format, a sub-question is a run of words ending in "?"."""
    out: list[str] = []
    for m in re.finditer(r'[A-Za-z][^?\n"\[\]]*\?', text):
        q = m.group().strip()
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
    steps: list[dict] = field(default_factory=list)
    memory_calls: int = 0
    answer: str = ""
    seconds: float = 0.0
    memory_version: str | None = None


def single_turn(question: str, executive: ChatLLM, memory: MemoryClient, max_subquestions: int = 2) -> Trace:
    """Decompose once, ask the memory everything, answer from the non-IDK answers."""
    t0 = time.time()
    tr = Trace(question)
    plan = executive.complete([{"role": "user", "content": DECOMPOSE.format(n=max_subquestions, q=question)}])
    subs = parse_subquestions(plan, max_subquestions)
    tr.steps.append({"role": "executive", "step": "decompose", "output": plan, "parsed": subs})
    # The user's own question goes to the memory too: a weak executive's decomposition may lose the
    # point, and the memory was trained on composite (cross-document) questions as well.
    questions = [question] + [q for q in subs if q.lower() != question.lower()]
    answers = memory.ask(questions)
    tr.memory_calls = len(questions)
    tr.memory_version = getattr(memory, "version", None)
    tr.steps += [{"role": "memory", "question": q, "answer": a} for q, a in zip(questions, answers)]
    facts = [a for a in answers if not is_idk(a)]
    if not facts:
        tr.answer = IDK_ANSWER
    else:
        prompt = ANSWER.format(facts="\n".join(f"- {f}" for f in dict.fromkeys(facts)), q=question)
        out = executive.complete([{"role": "user", "content": prompt}], max_tokens=48)
        tr.steps.append({"role": "executive", "step": "answer", "output": out})
        # A reply that carries no fact (empty, or naming nothing the question did not already name, as a
        # weak executive's "The lab is led by the head of the lab") must not reach the user: fall back to
        # the memory's own answer and say so in the trace.
        tr.answer = out.strip()
        direct = answers[0] if not is_idk(answers[0]) else ""
        lost = dropped_facts(tr.answer, question, direct) if direct else []
        if not adds_a_fact(tr.answer, question, facts):
            tr.answer = facts[0]
            tr.steps.append({"role": "executive", "step": "fallback", "output": facts[0],
                             "why": "the executive's answer named no name, number or date from the memory's answers"})
        elif lost:
            # Grounding guard: the memory answered the user's own question and the executive's rewrite
            # lost part of it (a weak executive drops the very name or number asked for); the memory's
            # answer is returned instead, and the trace says what was lost.
            tr.answer = direct
            tr.steps.append({"role": "executive", "step": "fallback", "output": direct,
                             "why": f"the executive's answer dropped {', '.join(lost)} from the memory's answer "
                                    "to the question"})
    tr.seconds = time.time() - t0
    return tr


def closed_book(question: str, executive: ChatLLM) -> str:
    return executive.complete([{"role": "user", "content": CLOSED_BOOK.format(q=question)}], max_tokens=48)


def make_executive(url: str | None, model: str | None, api_key: str | None, local: str) -> ChatLLM:
    if url:
        if not model:
            raise MemoError("--executive-model is required with --executive-url (the model name the endpoint serves)")
        return OpenAILLM(url, model, api_key)
    return LocalLLM(local)
