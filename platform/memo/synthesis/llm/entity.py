"""Step 4, entity surfacing: questions that describe an entity without naming it (one fact, two, 3+,
through a relation), answered with its name. The input row is a chunk."""

from __future__ import annotations

from memo.synthesis.llm.prompts import prompt_entity
from memo.synthesis.llm.rows import pairs, text


def run(w, records, usage):
    def parse(rec, obj, raw):
        rows = []
        for ent in pairs(obj, "entities"):
            name = text(ent.get("name"))
            for q in pairs(ent, "questions"):
                kind = text(q.get("kind")) or "one_fact"
                r = w.pair(rec, kind, q.get("question"), q.get("answer"), [rec["chunk_id"]])
                if r["status"] == "ok" and (not name or name.lower() in r["question"].lower()):
                    r.update(status="reject", reason="question_names_the_entity" if name else "no_entity_name")
                elif r["status"] == "ok" and name.lower() not in r["answer"].lower():
                    r.update(status="reject", reason="answer_does_not_name_the_entity")
                rows.append(r)
        return rows or [w.reject(rec, "no_pairs_in_json", raw, "entity")]

    return w.run_each(records, usage, prompt_entity, parse)
