"""More phrasings per fact: an instruct model rewrites direct reflections as the short relational
questions an executive asks ("What is the sibling of Natalie Wood?"), the answer unchanged.

Why: a memory trained on one or two template phrasings recites them (the `reflections_recited`
diagnostic) but misses the same fact asked another way (`memory_recall`); the paper's memory learns
from a 32B generator's many phrasings. The rewrites are short outputs, so the 1.5B model on llama.cpp
makes them cheaply. Each rewrite must still name something the original names (a question without its
subject teaches nothing), and becomes an `indirect` row: a rewording whose fact is also trained under
its first wording, which is what the held-out split and the promotion gate sample.
"""

from __future__ import annotations

import logging
import time

import pandas as pd

from memo.errors import MemoError
from memo.llm_json import parse_json
from memo.synthesis.schema import reflection_frame
from memo.text import find_spans

log = logging.getLogger(__name__)
PARAPHRASE_VERSION = "paraphrase-1"  # part of the synthesis resume key when paraphrases > 0
PROMPT = ("A question and its answer, from a document:\nQuestion: {q}\nAnswer: {a}\n\n"
          "Write {n} different short questions that ask for the same fact the way a person would ask it, for "
          "example \"Who is the spouse of X?\", \"Where was X born?\", \"Which company makes X?\". Every question "
          "must name its subject. Reply with JSON: {{\"questions\": [\"...\"]}}")


_QUESTION_WORDS = set("who whom whose what which where when why how is was are were does did do in on the a an".split())


def _names(text: str) -> set[str]:
    """The names, numbers and dates a text gives (a capitalised question word is not a name)."""
    return {sp["text"].lower() for sp in find_spans(text)} - _QUESTION_WORDS


def usable(rewrite: str, question: str, answer: str) -> bool:
    """A rewrite worth training on: a question of 3-30 words, not the original, naming something the
    original pair names."""
    words = rewrite.split()
    return (rewrite.endswith("?") and 3 <= len(words) <= 30 and rewrite.strip().lower() != question.strip().lower()
            and bool(_names(rewrite) & (_names(question) | _names(answer))))


def paraphrase(pairs: pd.DataFrame, domain: str, model: str, per_pair: int, max_pairs: int,
               parallel: int = 2) -> tuple[pd.DataFrame, dict]:
    """(new indirect rows, counts): up to `per_pair` rewrites of each of the first `max_pairs` direct rows."""
    from memo.engines.llamacpp import LlamaCppEngine
    from memo.gguf import resolve_gguf

    direct = pairs[pairs["step"] == "direct"].head(max_pairs)
    stats = {"in": len(direct), "calls": 0, "out": 0, "rejected": 0, "unusable": 0, "failed": 0}
    if direct.empty:
        return reflection_frame([], domain, ""), stats
    try:
        engine = LlamaCppEngine(resolve_gguf(model), threads=1, parallel=parallel)
    except MemoError as e:
        raise MemoError(f"paraphrase_model={model}: {e} (make install installs the pinned GGUFs)") from None
    t0, rows = time.time(), []
    prompts = [[{"role": "user", "content": PROMPT.format(q=r.question, a=r.answer, n=per_pair)}]
               for r in direct.itertuples()]
    replies, step = [], 8 * parallel
    try:
        for i in range(0, len(prompts), step):  # in rounds, so a long run reports progress
            replies += engine.chat(prompts[i:i + step], 32 * per_pair + 16, 0.7, json_mode=True)
            rate = (time.time() - t0) / len(replies)
            log.info(f"[synthesize] paraphrase: {len(replies)}/{len(prompts)} reflections, "
                     f"eta {rate * (len(prompts) - len(replies)):.0f} s")
    finally:
        engine.close()
    for r, reply in zip(direct.itertuples(), replies):
        stats["calls"] += 1
        obj, _ = parse_json(reply.text) if not reply.error else (None, "failed")
        got = obj.get("questions") if isinstance(obj, dict) else None
        if not isinstance(got, list):
            stats["failed"] += 1
            continue
        kept = [q.strip() for q in got if isinstance(q, str) and usable(q.strip(), r.question, r.answer)]
        stats["unusable"] += len(got) - len(kept)
        for q in list(dict.fromkeys(kept))[:per_pair]:
            rows.append({"step": "indirect", "question": q, "answer": r.answer,
                         "source_chunk_ids": list(r.source_chunk_ids), "verified": True})
    stats["out"], stats["rejected"] = len(rows), stats["unusable"] + stats["failed"]
    stats["seconds"] = round(time.time() - t0, 1)
    log.info(f"[synthesize] paraphrase ({model}): {stats['in']} direct reflections -> {stats['out']} rewrites "
             f"({stats['unusable']} unusable, {stats['failed']} replies without JSON) in {stats['seconds']} s")
    return reflection_frame(rows, domain, f"paraphrase:{model}"), stats
