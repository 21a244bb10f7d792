"""Benchmark loaders on the real third-party samples in ../shared (read in place) and the QA metrics."""


import pytest
from conftest import REPO, run_cli
from memo.errors import MemoError
from memo.evaluation.benchmarks import load_benchmark
from memo.text import exact_match, f1

DATA = REPO.parent / "shared" / "data" / "benchmarks"
FILES = {"musique": "musique/musique_ans_dev.sample80.jsonl", "hotpotqa": "hotpotqa/hotpot_dev_distractor.sample80.jsonl",
         "2wiki": "2wikimultihopqa/2wiki_dev.sample64.jsonl", "narrativeqa": "narrativeqa/narrativeqa_summaries.dev20.jsonl"}
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data/benchmarks is not beside the repo")


@needs_data
@pytest.mark.parametrize("name", list(FILES))
def test_loaders_give_a_corpus_holding_every_gold_paragraph(name):
    docs, qs = load_benchmark(name, DATA / FILES[name], limit=5)
    ids = {d.doc_id for d in docs}
    assert len(qs) == 5 and len(ids) == len(docs)
    for q in qs:
        assert q.question.strip() and q.answer.strip() and q.gold_doc_ids
        assert set(q.gold_doc_ids) <= ids
    if name == "musique":
        assert all(len(q.decomposition) >= 2 and q.decomposition[-1]["answer"] for q in qs)
    if name in ("musique", "hotpotqa", "2wiki"):
        assert len(docs) > len(qs) * 2  # distractors are part of the corpus
    noisy, _ = load_benchmark(name, DATA / FILES[name], limit=5, noise=2)
    assert len(noisy) >= len(docs) and {d.doc_id for d in docs} <= {d.doc_id for d in noisy}
    if name != "narrativeqa":  # NarrativeQA rows share their summary, so 10 more may add none
        assert len(noisy) > len(docs)


@needs_data
def test_corpus_command_writes_what_synthesize_reads(tmp_path):
    from memo.corpus import load_documents

    res = run_cli("corpus", "--benchmark", "musique", "--data", str(DATA / FILES["musique"]), "--limit", "3",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert len(load_documents(tmp_path / "corpus.jsonl")) == 60  # 3 questions x 20 paragraphs, no duplicates
    assert len((tmp_path / "questions.jsonl").read_text().splitlines()) == 3


def test_bad_benchmark_input_names_the_problem(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(MemoError, match=r"m.jsonl:1: not a musique record"):
        load_benchmark("musique", bad)
    with pytest.raises(MemoError, match="use one of"):
        load_benchmark("squad", bad)
    with pytest.raises(MemoError, match="no such file"):
        load_benchmark("hotpotqa", tmp_path / "missing.jsonl")


def test_metrics_normalise_and_take_the_best_alias():
    assert exact_match("The Velmora Maritime Society.", ["Velmora Maritime Society"]) == 1.0
    assert exact_match("1998", ["1999", "nineteen ninety-eight"]) == 0.0
    assert f1("in 1998", ["1998"]) == pytest.approx(2 / 3)
    assert f1("Wenna Ostrocliff", ["Ostrocliff", "Wenna Ostrocliff"]) == 1.0
    assert f1("", ["x"]) == 0.0


def test_coverage_counts_gold_hops_found_in_reflection_answers(tmp_path):
    import pandas as pd
    from memo.evaluation.benchmarks import Question
    from memo.evaluation.metrics import reflection_coverage

    qs = [Question("1", "Where was the keeper of the Orrin Light born?", "Vennick", aliases=["Vennick town"],
                   decomposition=[{"question": "Who keeps the Orrin Light?", "answer": "Mara Quill"},
                                  {"question": "Where was #1 born?", "answer": "Vennick"}]),
          Question("2", "Which river runs past Harlow?", "the Sable", aliases=["Sable River"])]
    df = pd.DataFrame({"answer": ["Mara Quill has kept the Orrin Light since 1990.", "The Sable River runs past Harlow.",
                                  "Vennicktown is not a place."]})  # whole words only: "Vennick" is not covered
    out = reflection_coverage(df, qs)
    assert (out["facts"], out["covered"]) == (3, 2) and out["by_hop"] == {"hop1": 1.0, "hop2": 0.0}
