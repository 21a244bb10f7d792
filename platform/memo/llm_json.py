"""JSON out of LLM replies: every executive turn and every generator step asks for one JSON object.

Repair is json_repair's (fences, single quotes, Python literals, trailing commas, replies cut off by
max_tokens); this module only finds the object in the reply and says how it was read.
"""

from __future__ import annotations

import json
import re

import json_repair

_FENCE = re.compile(r"```(?:json)?")
# A {"question": ..., "answer": ...} object spelled out whole, wherever it sits in a broken reply.
_QA = re.compile(r'\{\s*"question"\s*:\s*"((?:\\.|[^"\\])*)"\s*,\s*"answer"\s*:\s*"((?:\\.|[^"\\])*)"\s*\}?')


def parse_json(text: str) -> tuple[dict | None, str]:
    """(object, how): how is "json" (parsed as is), "repaired" or "failed" (no object in the reply)."""
    t = _FENCE.sub("", text or "").strip()
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
    obj = json_repair.loads(body)
    if isinstance(obj, list):  # repair of `{...} trailing text` can come back as [obj, ...]
        obj = next((x for x in obj if isinstance(x, dict)), None)
    return (obj, "repaired") if isinstance(obj, dict) and obj else (None, "failed")


def salvage_pairs(text: str) -> list[dict]:
    """Every complete {"question": ..., "answer": ...} object in a reply, in order, each once: what a reply
    whose JSON is broken beyond repair (mismatched brackets, a list repeated until max_tokens) still says."""
    seen, out = set(), []
    for q, a in _QA.findall(text or ""):
        try:
            q, a = json.loads(f'"{q}"'), json.loads(f'"{a}"')
        except json.JSONDecodeError:
            continue
        if (q, a) not in seen:
            seen.add((q, a))
            out.append({"question": q, "answer": a})
    return out
