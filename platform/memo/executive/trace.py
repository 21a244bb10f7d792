"""The trace of one protocol run: every executive and memory message, the parsed state per turn, and
the calls and tokens both sides spent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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


class Meter:
    """Counts what one protocol run cost, as the difference of the clients' usage counters."""

    def __init__(self, executive, memory):
        self.executive, self.memory = executive, memory
        self.e0, self.m0 = usage_of(executive), usage_of(memory)

    def close(self, tr: Trace, t0: float) -> Trace:
        e, m = usage_of(self.executive), usage_of(self.memory)
        tr.executive_calls, tr.executive_tokens = e[0] - self.e0[0], e[1] - self.e0[1]
        tr.memory_calls, tr.memory_tokens = m[0] - self.m0[0], m[1] - self.m0[1]
        tr.memory_version = getattr(self.memory, "version", None)
        tr.seconds = round(time.time() - t0, 3)
        return tr


def ask_and_record(tr: Trace, memory, questions: list[str], **tags) -> list[str]:
    """Ask the memory; the trace keeps each answer, and where the client reports them its confidence and
    the raw answer an abstention threshold turned into "I don't know"."""
    if not questions:
        return []
    detailed = getattr(memory, "ask_detailed", None)
    rows = detailed(questions) if detailed else [{"answer": a} for a in memory.ask(questions)]
    tr.steps += [{"role": "memory", "question": q, **r, **tags} for q, r in zip(questions, rows)]
    return [r["answer"] for r in rows]
