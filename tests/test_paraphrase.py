"""LLM paraphrases of direct reflections: the filter on what a rewrite must be, and (slow, with the
pinned 0.5B model on llama.cpp) the rewrites a real instruct model writes."""

import pandas as pd
import pytest
from memo.synthesis.paraphrase import paraphrase, usable

Q, A = "Who keeps the Orrin lighthouse?", "Mara Quill keeps the Orrin lighthouse on Tessel Island."


def test_a_rewrite_must_be_a_new_question_that_names_its_subject():
    assert usable("Who is the keeper of the Orrin lighthouse?", Q, A)
    assert usable("What does Mara Quill keep?", Q, A)
    assert not usable("Who keeps it?", Q, A)                        # names nothing the pair names
    assert not usable("who keeps the orrin lighthouse?", Q, A)      # the original again
    assert not usable("The keeper of the Orrin lighthouse", Q, A)   # not a question
    assert not usable("Who " + "really " * 30 + "keeps the Orrin lighthouse?", Q, A)


@pytest.mark.slow
def test_a_real_model_rewrites_direct_rows_into_indirect_ones():
    from memo.engines.llamacpp import available
    from memo.errors import MemoError
    from memo.gguf import resolve_gguf

    try:
        resolve_gguf("qwen2.5-coder-0.5b")
    except MemoError:
        pytest.skip("qwen2.5-coder-0.5b is not installed")
    if not available():
        pytest.skip("llama-server is not installed")
    pairs = pd.DataFrame([
        {"step": "direct", "question": Q, "answer": A, "source_chunk_ids": ["a#0"]},
        {"step": "direct", "question": "When was the Orrin lighthouse built?",
         "answer": "The Orrin lighthouse was built in 1881.", "source_chunk_ids": ["a#0"]},
        {"step": "abstain", "question": "Who founded Zorbex?", "answer": "I don't know.", "source_chunk_ids": []}])
    rows, stats = paraphrase(pairs, "lh", "qwen2.5-coder-0.5b", 2, 10)
    assert stats["in"] == 2 and stats["calls"] == 2 and stats["out"] == len(rows) >= 2
    assert set(rows.step) == {"indirect"} and set(rows.answer) <= {A, "The Orrin lighthouse was built in 1881."}
    assert all(usable(q, Q, A) or usable(q, "When was the Orrin lighthouse built?", "built in 1881")
               for q in rows.question)
    assert rows.generator.iloc[0] == "paraphrase:qwen2.5-coder-0.5b" and rows.id.is_unique
