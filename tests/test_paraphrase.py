"""LLM paraphrases of direct reflections: the filter on what a rewrite must be, and (slow, with the
pinned 0.5B model on llama.cpp) the rewrites a real instruct model writes."""

import pandas as pd
import pytest
from memo.synthesis.paraphrase import paraphrase, usable

Q, A = "Who keeps the Orrin lighthouse?", "Mara Quill keeps the Orrin lighthouse on Tessel Island."


def test_a_rewrite_must_be_a_new_question_about_the_same_fact():
    assert usable("Who is the keeper of the Orrin lighthouse?", Q, A)
    assert usable("What does Mara Quill keep?", Q, A)                 # the inverse question
    assert usable("Who tends the lighthouse on Tessel Island?", Q, A)
    assert not usable("Who keeps it?", Q, A)                        # names nothing the pair names
    assert not usable("who keeps the orrin lighthouse?", Q, A)      # the original again
    assert not usable("The keeper of the Orrin lighthouse", Q, A)   # not a question
    assert not usable("Who " + "really " * 30 + "keeps the Orrin lighthouse?", Q, A)
    # What the 0.5B model wrote from relation templates: a name the pair lacks, or another fact
    assert not usable("Who is the wife of John?", Q, A)
    assert not usable("Who is the spouse of X?", Q, A)
    assert not usable("Where was Mara Quill born?", Q, A)
    assert not usable("Which company makes Mara Quill?", Q, A)
    built = "The Orrin lighthouse was built in 1881."
    assert usable("In which year was the Orrin lighthouse constructed?", "When was the Orrin lighthouse built?", built)
    assert usable("What was built in 1881?", "When was the Orrin lighthouse built?", built)
    # asks for a year; the answer has one, but this asks about another relation
    assert not usable("What is the birth year of the Orrin lighthouse?", "When was the Orrin lighthouse built?", built)
    assert usable("In what year did Gou become empress?", "When did Gou become empress?", "Gou became empress in 357.")
    # a "how many" rewrite needs a number in the answer
    assert not usable("How many keepers does the Orrin lighthouse have?", Q, A)


@pytest.mark.slow
def test_a_real_model_rewrites_direct_rows_into_indirect_ones():
    """The pinned 0.5B model (the paraphrase option a CPU affords; the 1.5B default writes the same JSON at
    ~3x the time), sampled with a fixed seed: the same rewrites on every run of one build, but which ones
    varies by CPU (the build's kernels), so this asserts what holds everywhere: the model's questions come
    back kept or rejected, and each rewrite kept is a usable question under its own answer. How many it
    keeps is the model's yield, not a property of the code: 1 of 9 on a 2-core AVX2 EPYC (seed 0); an
    unseeded run once kept none of 9."""
    from memo.engines.llamacpp import available
    from memo.errors import MemoError
    from memo.gguf import resolve_gguf

    model = "qwen2.5-coder-0.5b"
    try:
        resolve_gguf(model)
    except MemoError:
        pytest.skip(f"{model} is not installed")
    if not available():
        pytest.skip("llama-server is not installed")
    built = ("When was the Orrin lighthouse built?", "The Orrin lighthouse was built in 1881.")
    founded = ("Who founded the Halvenmere Cooperative?", "The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen.")
    pairs = pd.DataFrame([{"step": "direct", "question": q, "answer": a, "source_chunk_ids": ["a#0"]}
                          for q, a in [(Q, A), built, founded]]
                         + [{"step": "abstain", "question": "Who founded Zorbex?", "answer": "I don't know.",
                             "source_chunk_ids": []}])
    rows, stats = paraphrase(pairs, "lh", model, 3, 10)
    assert stats["in"] == 3 and stats["calls"] == 3 and stats["out"] == len(rows), stats
    # questions came back, each one kept or rejected (a reply without JSON counts as rejected too), and a
    # user who sees few rewrites gets examples of the rejected ones
    assert stats["out"] + stats["rejected"] >= 3 and len(stats["unusable_examples"]) == min(5, stats["unusable"])
    originals = dict([(A, Q), built[::-1], founded[::-1]])
    assert set(rows.step) <= {"indirect"} and set(rows.answer) <= set(originals)
    assert all(usable(q, originals[a], a) for q, a in zip(rows.question, rows.answer))
    assert not set(rows.question) & set(originals.values())
    assert (rows.groupby("answer").size() <= 3).all() and rows.id.is_unique
    assert set(rows.generator) <= {f"paraphrase:{model}"}
