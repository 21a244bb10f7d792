"""More phrasings per fact: an instruct model rewrites direct reflections as the short relational
questions an executive asks ("What is the sibling of Natalie Wood?"), the answer unchanged.

Why: a memory trained on one or two template phrasings recites them (the `reflections_recited`
diagnostic) but misses the same fact asked another way (`memory_recall`); the paper's memory learns
from a 32B generator's many phrasings. The rewrites are short outputs, so the 1.5B model on llama.cpp
makes them cheaply. Each rewrite must ask for the pair's own fact (`usable`: its names, its relation, a
span of the kind asked for in its answer; a question about another fact would be trained under an
answer that does not say it), and becomes an `indirect` row: a rewording whose fact is also trained under
its first wording, which is what the held-out split and the promotion gate sample.
"""

from __future__ import annotations

import logging
import time

import pandas as pd

from memo.errors import MemoError
from memo.llm_json import parse_json
from memo.synthesis.schema import reflection_frame
from memo.text import content_words, find_spans, stems, wanted_kinds

log = logging.getLogger(__name__)
PARAPHRASE_VERSION = "paraphrase-3"  # part of the synthesis resume key when paraphrases > 0
PROMPT = ("A question and its answer, from a document:\nQuestion: {q}\nAnswer: {a}\n\n"
          "Write {n} other short questions that ask for this same fact, the way a person would ask it: as the "
          "relation of a name (\"the designer of\", \"the spouse of\"), in other words, or from the answer's side. "
          "Use only the names in the question and the answer. Reply with JSON: {{\"questions\": [\"...\"]}}")
# Worked examples as finished chat turns, in the relational style executives decompose into ("What is
# the spouse of X?"), rather than templates in the instruction: given "Who is the spouse of X?" and
# "Which company makes X?" as examples, the 0.5B model copied them verbatim into most replies over
# six rounds, with X, John or the pair's subject filled in.
EXAMPLE = [
    {"role": "user", "content": PROMPT.format(q="Who designed the Varn Bridge?", n=3,
                                              a="Ilse Dorn designed the Varn Bridge in 1902.")},
    {"role": "assistant", "content": '{"questions": ["Who is the designer of the Varn Bridge?", '
                                     '"Which engineer designed the Varn Bridge?", "What did Ilse Dorn design?"]}'},
    {"role": "user", "content": PROMPT.format(q="Whom did Tomas Vell marry?", n=2,
                                              a="In 1950 Tomas Vell married the painter Ada Rusk.")},
    {"role": "assistant", "content": '{"questions": ["What is the spouse of Tomas Vell?", '
                                     '"Who is the wife of Tomas Vell?"]}'}]
# Words that say what kind of answer is wanted, not which relation: a rewrite may add them freely.
_ANSWER_TYPES = set("year date day month place city town country person people man woman name company".split())


def _name_words(text: str) -> set[str]:
    """The words of the names, numbers and dates a text gives (a capitalised question word is not a name;
    in "340 members" only the number is)."""
    return {w for sp in find_spans(text)
            for w in content_words(sp["text"].split()[0] if sp["kind"] == "number" else sp["text"])}


def _relation_stems(text: str) -> set[str]:
    """The stems of what a text says around its names ("graduated" stays a relation word even where the
    text also names the "Post Graduate Institute")."""
    for sp in sorted(find_spans(text), key=lambda sp: -sp["start"]):
        text = text[:sp["start"]] + " " + text[sp["end"]:]
    return stems(text, 4)


def usable(rewrite: str, question: str, answer: str) -> bool:
    """A rewrite worth training on under the pair's answer: a question of 3-30 words, not the original,
    that names something the pair names and no name the pair does not ("Who is the wife of John?"), and
    asks about the pair's relation: it shares a relation or object word with the pair ("keeper" for
    "keeps", "lighthouse") and adds at most two new ones, so "Where was Mara Quill born?", a question
    about the right subject that the pair's answer does not answer, is out. The answer must also hold a
    span of the kind the rewrite asks for (a year for "When...?") that the rewrite does not give away."""
    words = rewrite.split()
    if not (rewrite.endswith("?") and 3 <= len(words) <= 30 and rewrite.strip().lower() != question.strip().lower()):
        return False
    pair = f"{question} {answer}"
    names, pair_names = _name_words(rewrite), _name_words(pair)
    if not names & pair_names or names - content_words(pair):
        return False
    said, known = _relation_stems(rewrite) - {w[:4] for w in _ANSWER_TYPES}, _relation_stems(pair)
    if not (said & known) or len(said - known) > 2:
        return False
    asked, kinds = rewrite.lower(), set(wanted_kinds(rewrite))
    if "year" in kinds:
        kinds.add("number")  # find_spans reads only 1500-2099 as years: "became empress in 357"
    return any(sp["kind"] in kinds and sp["text"].lower() not in asked for sp in find_spans(answer))


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
        # seeded: the same settings give the same rewrites on a rerun (sampled at 0.7 for variety)
        engine = LlamaCppEngine(resolve_gguf(model), threads=1, parallel=parallel, seed=0)
    except MemoError as e:
        raise MemoError(f"paraphrase_model={model}: {e} (make install installs the pinned GGUFs)") from None
    t0, rows, rejected = time.time(), [], []
    prompts = [EXAMPLE + [{"role": "user", "content": PROMPT.format(q=r.question, a=r.answer, n=per_pair)}]
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
        # A few of the rejected rewrites, so a user who sees few rewrites can tell the model from the filter.
        rejected += [f"{r.question} -> {q}" for q in got if str(q).strip() not in kept][:5 - len(rejected)]
        for q in list(dict.fromkeys(kept))[:per_pair]:
            rows.append({"step": "indirect", "question": q, "answer": r.answer,
                         "source_chunk_ids": list(r.source_chunk_ids), "verified": True})
    stats["out"], stats["rejected"] = len(rows), stats["unusable"] + stats["failed"]
    stats["seconds"], stats["unusable_examples"] = round(time.time() - t0, 1), rejected
    log.info(f"[synthesize] paraphrase ({model}): {stats['in']} direct reflections -> {stats['out']} rewrites "
             f"({stats['unusable']} unusable, {stats['failed']} replies without JSON) in {stats['seconds']} s")
    return reflection_frame(rows, domain, f"paraphrase:{model}"), stats
