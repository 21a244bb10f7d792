"""Step 1, extraction: two passes per chunk, direct facts and indirect facts (relations both ways,
computed attributes, resolved pronouns and times). The input row is (chunk, pass)."""

from __future__ import annotations

from memo.synthesis.llm.prompts import prompt_direct, prompt_indirect
from memo.synthesis.llm.rows import pairs


def run(w, records, usage):
    def prompt(rec):
        return prompt_direct(rec) if rec["pass"] == "direct" else prompt_indirect(rec)

    def parse(rec, obj, raw):
        # A repaired reply can nest junk in the list (a half-repeated {"pairs": ...}): only pair-shaped items count.
        found = [p for p in pairs(obj, "pairs") if "question" in p or "answer" in p]
        if not found:
            return [w.reject(rec, "no_pairs_in_json", raw, rec["pass"])]
        return [w.pair(rec, rec["pass"], p.get("question"), p.get("answer"), [rec["chunk_id"]]) for p in found]

    return w.run_each(records, usage, prompt, parse, salvage="pairs")
