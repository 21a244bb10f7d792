"""The EXECUTIVE side: any chat LLM questions the memory and answers the user.

Two protocols, as in the paper: `single` (decompose once, ask everything, answer) and `structured`
(grounding, entity pinning, answer seeking, final synthesis). Each memory call is a fresh single-turn
chat: the executive never sees documents, and the memory never sees the conversation. Every run
returns a Trace.
"""

from __future__ import annotations

from memo.config import ExecutiveConfig
from memo.executive.single import closed_book, single_turn
from memo.executive.structured import structured
from memo.executive.trace import Trace


def answer_question(question: str, executive, memory, cfg: ExecutiveConfig | None = None) -> Trace:
    """The protocol that `cfg.protocol` names."""
    cfg = cfg or ExecutiveConfig()
    return (structured if cfg.protocol == "structured" else single_turn)(question, executive, memory, cfg)


__all__ = ["Trace", "answer_question", "closed_book", "single_turn", "structured"]
