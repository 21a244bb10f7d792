"""One row schema for every step's output (pairs, rejects with a reason, inputs that gave nothing),
and the checks and helpers every step's parser shares."""

from __future__ import annotations

import re

# One schema for every step's output: pairs, rejects ("reason" set) and inputs that gave nothing.
STEP_COLUMNS = ["input_id", "status", "step", "kind", "question", "answer", "source_chunk_ids", "merged_from",
                "verified", "reason", "raw", "calls", "prompt_tokens", "completion_tokens"]


def row(input_id, status, step, kind="", question="", answer="", chunk_ids=(), merged=(), verified=False,
         reason="", raw="") -> dict:
    return {"input_id": input_id, "status": status, "step": step, "kind": kind, "question": question,
            "answer": answer, "source_chunk_ids": list(chunk_ids), "merged_from": list(merged),
            "verified": verified, "reason": reason, "raw": raw[:500], "calls": 0, "prompt_tokens": 0,
            "completion_tokens": 0}


def text(v) -> str:
    return re.sub(r"\s+", " ", v).strip() if isinstance(v, str) else ""


def pairs(obj: dict, key: str) -> list[dict]:
    items = obj.get(key)
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


_META = re.compile(r"\bjson\b|\bthe (text|passage|document|story) (above|below)\b|\bthis (json|prompt)\b", re.I)


def picked(refs, n: int, prefix: str = "") -> list[int]:
    """0-based indexes of the items a reply refers to by number ("p3" or 3, counting from 1), each once,
    in order; references out of range or malformed are ignored."""
    out = set()
    for r in refs if isinstance(refs, list) else []:
        m = re.fullmatch(rf"{prefix}(\d+)", str(r).strip())
        if m and 0 < int(m.group(1)) <= n:
            out.add(int(m.group(1)) - 1)
    return sorted(out)


def check_pair(question: str, answer: str) -> str:
    """Shape checks every generated pair passes, whatever the engine: empty, echo, or not a question."""
    if len(question) < 8 or len(answer) < 1:
        return "empty_field"
    if question.lower() == answer.lower():
        return "answer_repeats_question"
    if len(question) > 600 or len(answer) > 1500:
        return "over_long_pair"
    if "?" not in question:
        return "not_a_question"
    if _META.search(question) or _META.search(answer):  # the prompt leaking into the pair
        return "mentions_the_prompt"
    return ""
