"""Step 2, consolidation: per document with enough pairs, composite questions over 2-4+ of them,
recording which pairs each merges. The input row is one document with its step-1 pairs."""

from __future__ import annotations

from memo.synthesis.llm.prompts import prompt_consolidate
from memo.synthesis.llm.rows import pairs, picked


def run(w, records, usage):
    def prompt(rec):
        return prompt_consolidate(rec["title"], rec["pairs"])

    def parse(rec, obj, raw):
        rows = []
        for c in pairs(obj, "composites"):
            idx = picked(c.get("merged"), len(rec["pairs"]), "p")
            if len(idx) < 2:
                rows.append(w.too_few(rec, "composite", c, "merged_fewer_than_2_pairs"))
                continue
            ids = [rec["pairs"][k]["pair_id"] for k in idx]
            chunks = sorted({cid for k in idx for cid in rec["pairs"][k]["source_chunk_ids"]})
            rows.append(w.pair(rec, f"composite_{min(len(idx), 4)}", c.get("question"), c.get("answer"), chunks, ids))
        return rows or [w.reject(rec, "no_pairs_in_json", raw, "composite")]

    return w.run_each(records, usage, prompt, parse)
