"""Fact text: the corpus' own statements trained beside the question/answer reflections.

A model that only ever sees a fact as the answer to one question stores it poorly; the same fact also
trained as a plain statement, mixed into the same shuffled stream, is answered more often in new
wordings (Jiang et al. 2024, "Instruction-tuned LMs are better knowledge learners": QA together with
the documents, 30 -> 45-48 EM). The statements are the corpus sentences after the synthesis rewrite
(a leading pronoun resolved to the document's subject, relative years made absolute, the subject's
last name alone made its full name), each alone: no
document id, no neighbouring sentence, and never the source text in a QA example's context (that stops
the facts from being stored, "contextual shadowing"). Loss is next-token over the whole statement.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memo.errors import MemoError
from memo.synthesis.questions import check_self_contained
from memo.synthesis.rules import chunk_sentences
from memo.text import find_spans
from memo.training.data import IGNORE


def fact_statements(chunks: pd.DataFrame) -> list[str]:
    """The chunks' sentences that state something (a name, number or date, 4 words or more) and stand
    alone once rewritten (the rules generator's sentences: pronouns resolved, full names), once each."""
    out: dict[str, None] = {}
    for chunk in chunks.to_dict("records"):
        for s in chunk_sentences(chunk, full_names=True):
            if len(s.split()) >= 4 and find_spans(s) and not check_self_contained(s, s):
                out[s] = None
    return list(out)


def load_fact_statements(reflections: str) -> list[str]:
    """The statements of the corpus a reflections folder was synthesized from (its chunks.parquet)."""
    p = Path(reflections)
    f = p / "chunks.parquet"
    if not f.exists():
        raise MemoError(f"--reflections {reflections}: fact_text needs the corpus' chunks (chunks.parquet beside "
                        "reflections.parquet, written by `memo synthesize`); give the synthesize output folder "
                        "or set train.fact_text=off")
    return fact_statements(pd.read_parquet(f))


def encode_statement(tok, text: str) -> tuple[list[int], list[int]]:
    """input_ids and labels of one statement: plain text, no chat template, loss on every token after
    the first (and on the end-of-text token, so the memory learns where a statement ends)."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, [IGNORE] + ids[1:]
