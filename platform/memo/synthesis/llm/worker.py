"""The step worker: one Ray Data actor class for every step of the LLM generator. It asks the engine (with
re-asks for replies that are not JSON) and turns each input row into output rows; the step module
(`synthesis.llm.<step>`) decides the prompt and how a reply is parsed."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd

from memo.engines import make_engine
from memo.llm_json import parse_json, salvage_pairs
from memo.synthesis.llm import consolidate, cross_doc, entity, extract, verify
from memo.synthesis.llm.prompts import messages
from memo.synthesis.llm.rows import STEP_COLUMNS, check_pair, pairs, row, text

STEPS = {"extract": extract.run, "consolidate": consolidate.run, "verify": verify.run, "entity": entity.run,
         "cross_doc": cross_doc.run}


class StepWorker:
    """`map_batches` callable: input rows of one step -> output rows (STEP_COLUMNS). Every input yields at
    least one row, so a re-run knows it is done. The engine is anything with `chat(batch) -> [Reply]`."""

    def __init__(self, step: str, engine, max_tokens: int, temperature: float, json_retries: int,
                 verify_attempts: int = 5, max_chunk_tokens: int = 3000):
        self.step, self.engine, self.max_tokens, self.temperature = step, engine, max_tokens, temperature
        self.json_retries, self.verify_attempts, self.max_chunk_tokens = json_retries, verify_attempts, max_chunk_tokens

    def ask(self, prompts: list[str], usage: list[Counter], max_tokens: int = 0,
            salvage: str = "") -> list[tuple[dict | None, str, str]]:
        """(object, error, raw reply) per prompt, in one engine round per attempt. With `salvage`, a reply
        whose JSON is broken beyond repair still yields the question/answer objects it spells out whole,
        as {salvage: [...]}."""
        results: list[tuple[dict | None, str, str]] = [(None, "", "")] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.json_retries + 1):
            # Every step's reply is a JSON object: engines that can constrain decoding to one do.
            replies = self.engine.chat([messages(prompts[i], attempt > 0) for i in pending],
                                       max_tokens or self.max_tokens, self.temperature, json_mode=True)
            retry = []
            for i, r in zip(pending, replies):
                usage[i].update(calls=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
                if r.error:
                    results[i] = (None, r.error, r.text)
                    continue
                obj, _how = parse_json(r.text)
                if salvage and (obj is None or not pairs(obj, salvage)):
                    found = salvage_pairs(r.text)
                    obj = {salvage: found} if found else obj
                results[i] = (obj, "" if obj is not None else "bad_json", r.text)
                if obj is None:
                    retry.append(i)
            pending = retry
            if not pending:
                break
        return results

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        usage = [Counter() for _ in records]
        rows_per_input = STEPS[self.step](self, records, usage)
        out = []
        for rec, rows, u in zip(records, rows_per_input, usage):
            if not rows:
                rows = [row(rec["input_id"], "empty", self.step, reason="no pairs in the reply")]
            rows[0].update(calls=u["calls"], prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"])
            out += rows
        return pd.DataFrame(out, columns=STEP_COLUMNS)

    def too_long(self, rec: dict) -> str:
        n = len(rec["text"].split()) if "text" in rec else 0
        return f"too_long: {n} words > max_chunk_tokens={self.max_chunk_tokens}" if n > self.max_chunk_tokens else ""

    def reject(self, rec, reason, raw="", kind="") -> dict:
        return row(rec["input_id"], "reject", self.step, kind, reason=reason, raw=raw,
                   chunk_ids=rec.get("chunk_ids", [rec.get("chunk_id", "")]))

    def too_few(self, rec, kind, item: dict, reason: str) -> dict:
        """A merge or cross-document question that does not use enough of its sources."""
        return row(rec["input_id"], "reject", self.step, kind, text(item.get("question")),
                   text(item.get("answer")), rec["chunk_ids"], reason=reason)

    def pair(self, rec, kind, q, a, chunk_ids, merged=()) -> dict:
        q, a = text(q), text(a)
        bad = check_pair(q, a)
        if bad:
            return row(rec["input_id"], "reject", self.step, kind, q, a, chunk_ids, merged, reason=bad)
        return row(rec["input_id"], "ok", self.step, kind, q, a, chunk_ids, merged)

    def run_each(self, records, usage, make_prompt, parse, salvage: str = "") -> list[list[dict]]:
        """Shared body of most steps: a prompt per record (or a reject), one engine round, a parse per reply."""
        out: list[list[dict]] = [[] for _ in records]
        todo = []
        for i, rec in enumerate(records):
            reason = self.too_long(rec)
            if reason:
                out[i] = [self.reject(rec, reason)]
            else:
                todo.append(i)
        answers = self.ask([make_prompt(records[i]) for i in todo], [usage[i] for i in todo], salvage=salvage)
        for i, (obj, err, raw) in zip(todo, answers):
            out[i] = [self.reject(records[i], err, raw)] if obj is None else parse(records[i], obj, raw)
        return out


class StepActor(StepWorker):
    """The Ray Data actor: builds its engine from a picklable spec once per actor process, and decodes the
    JSON-packed nested columns of each batch (lists of dicts do not survive Arrow exactly)."""

    def __init__(self, engine_spec: dict, threads: int, nested: list[str], **kw):
        super().__init__(engine=make_engine(engine_spec, threads), **kw)
        self.nested = nested

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        for c in self.nested:
            batch[c] = batch[c].map(json.loads)
        return super().__call__(batch)
