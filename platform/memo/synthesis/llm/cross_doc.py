"""Step 5, cross-document synthesis: converging-clue and parallel-property questions whose answer needs
two or more documents of a group formed from the corpus alone. The input row is a group of chunks."""

from __future__ import annotations

from memo.synthesis.llm.prompts import prompt_cross
from memo.synthesis.llm.rows import pairs, picked, text


def run(w, records, usage):
    def prompt(rec):
        return prompt_cross(rec["docs"], rec["why"])

    def parse(rec, obj, raw):
        rows = []
        for q in pairs(obj, "questions"):
            used = picked(q.get("documents"), len(rec["docs"]))
            kind = text(q.get("kind")) or "converging"
            if len(used) < 2:
                rows.append(w.too_few(rec, kind, q, "fewer_than_2_documents"))
                continue
            rows.append(w.pair(rec, kind, q.get("question"), q.get("answer"), [rec["docs"][k]["chunk_id"] for k in used]))
        return rows or [w.reject(rec, "no_pairs_in_json", raw, "cross_doc")]

    return w.run_each(records, usage, prompt, parse)
