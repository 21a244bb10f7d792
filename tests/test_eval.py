"""`memo eval`: baselines, the gold-decomposition diagnostic, the harness's outputs, resume and errors.
The benchmark file here is written by the test in MuSiQue's public schema from the project's own demo
corpus; the real third-party samples are exercised in test_evaluation.py."""

import json
from pathlib import Path

import pytest
from conftest import DEMO_CORPUS, run_cli
from memo.evaluation.baselines import BM25Index, expanded_search, gold_subquestion
from memo.text import short_answer
from memo.evaluation.harness import markdown_table, summarize

DOCS = {d["id"]: d for d in map(json.loads, DEMO_CORPUS.read_text().splitlines())}


def musique_file(path, noise_records: bool = False):
    """Two 2-hop questions in MuSiQue's schema; every other demo document is a distractor paragraph.
    `noise_records`: two more records after them (other gold paragraphs), what `--noise 1` adds."""
    questions = [
        ("2hop__1", "Where was the founder of the Halvenmere Cooperative born?", "Quillstead", ["doc-01", "doc-02"],
         [("Who founded the Halvenmere Cooperative?", "Ysolde Marrowfen"), ("#1 >> place of birth", "Quillstead")]),
        ("2hop__2", "Which division designs the Vessamere Lantern, and where is it based?", "Skarreth Point",
         ["doc-03", "doc-04"],
         [("Which division designs the Vessamere Lantern?", "Glimmerfield Division"), ("Where is #1 based?",
                                                                                       "Skarreth Point")]),
    ]
    if noise_records:
        questions += [
            ("2hop__3", "Who runs the Saltmarrow Works?", "Tobiah Quenlark", ["doc-05", "doc-06"],
             [("Who runs the Saltmarrow Works?", "Tobiah Quenlark"), ("#1 >> occupation", "engineer")]),
            ("2hop__4", "What does the Ketterline Lab build?", "the Thistlewire Relay", ["doc-09", "doc-10"],
             [("What does the Ketterline Lab build?", "the Thistlewire Relay"), ("#1 >> owner", "Ketterline")]),
        ]
    with open(path, "w") as f:
        for qid, q, a, gold, decomp in questions:
            paragraphs = [{"idx": i, "title": d["title"], "paragraph_text": d["text"], "is_supporting": k in gold}
                          for i, (k, d) in enumerate(DOCS.items())]
            f.write(json.dumps({"id": qid, "paragraphs": paragraphs, "question": q, "answer": a, "answer_aliases": [],
                                "answerable": True, "question_decomposition": [
                                    {"id": i, "question": sq, "answer": sa, "paragraph_support_idx": 0}
                                    for i, (sq, sa) in enumerate(decomp)]}) + "\n")
    return path


def test_gold_subquestions_substitute_earlier_answers_and_read_the_graph_form():
    assert gold_subquestion("#1 >> place of birth", ["Ysolde Marrowfen"]) == \
        "What is the place of birth of Ysolde Marrowfen?"
    assert gold_subquestion("Where is #1 based?", ["Glimmerfield Division"]) == "Where is Glimmerfield Division based?"
    assert gold_subquestion("who played susan walker", []) == "Who played susan walker?"
    assert short_answer("Who founded the Halvenmere Cooperative?",
                        "The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen.") == "Ysolde Marrowfen"
    # the kind the question asks for: a year for "when", a count for "how many"
    assert short_answer("When was the Halvenmere Cooperative founded?",
                        "Ysolde Marrowfen founded the Halvenmere Cooperative in 1987.") == "1987"
    assert short_answer("How many people work in the Glimmerfield Division?",
                        "The Glimmerfield Division has 138 people.").startswith("138")
    assert short_answer("In which year was the Halvenmere Cooperative founded?",
                        "Ysolde Marrowfen founded it.") == "Ysolde Marrowfen"


def test_expanded_search_adds_the_bridge_passage_and_keeps_the_questions_top():
    passages = [{"doc_id": k, "title": d["title"], "text": d["text"]} for k, d in DOCS.items()]
    index = BM25Index(passages)
    question = "Where is the product that the Glimmerfield Division designed put together?"
    plain = index.search(question, 4)
    # the memory names the bridge entity; its passage joins the question's own top two
    hits = expanded_search(index, question, ["The Glimmerfield Division designed the Vessamere Lantern."], 4)
    assert len(hits) == 4 and len({p["doc_id"] for p in hits}) == 4
    assert plain[0] in hits and plain[1] in hits
    assert "doc-04" in [p["doc_id"] for p in hits]
    assert expanded_search(index, question, [], 4) == plain


def test_bm25_ranks_the_passage_that_shares_the_rare_words_first():
    passages = [{"doc_id": k, "title": d["title"], "text": d["text"]} for k, d in DOCS.items()]
    top = BM25Index(passages).search("Where is the Vessamere Lantern assembled?", 3)
    assert top[0]["doc_id"] == "doc-04" and len(top) == 3
    assert len(BM25Index(passages[:2]).search("lantern", 9)) == 2  # k larger than the corpus


def test_summary_and_table():
    rows = [{"method": "bm25", "em": 1.0, "f1": 1.0, "contains": 1.0, "memory_calls": 0, "latency_s": 2.0,
             "executive_tokens": 100, "judge": None},
            {"method": "bm25", "em": 0.0, "f1": 0.5, "contains": 0.0, "memory_calls": 0, "latency_s": 4.0,
             "executive_tokens": 300, "judge": None, "json_turns": 3, "json_failed": 1,
             # engine timings: 400 prompt tokens in 2 s, 60 completion tokens in 3 s
             "executive_prefill_tokens": 400, "executive_prefill_ms": 2000, "executive_completion_tokens": 60,
             "executive_decode_ms": 3000}]
    res = summarize(rows, ["bm25", "oracle"], "musique", 2)
    assert res["methods"] == {"bm25": {"em": 0.5, "f1": 0.75, "contains": 0.5, "memory_calls_per_q": 0.0,
                                       "latency_s_per_q": 3.0, "executive_tokens_per_q": 200.0, "n": 2,
                                       "json_turns": 3, "json_parse_failures": 1,
                                       "executive_prefill_tok_s": 200.0, "executive_decode_tok_s": 20.0,
                                       "em_ci": [0.0, 1.0], "f1_ci": [0.5, 1.0], "contains_ci": [0.0, 1.0]}}
    assert ("| bm25 | 0.500 [0.00, 1.00] | 0.750 [0.50, 1.00] | 0.500 [0.00, 1.00] | 0.0 | 3.0 | 200 | 1/3 | "
            "200 / 20.0 |") in markdown_table(res)


def test_the_share_of_gold_paragraphs_read_says_whether_retrieval_or_the_reader_lost_it():
    from memo.evaluation.benchmarks import Question
    from memo.evaluation.harness import _gold_passages_read

    q = Question(qid="q", question="?", answer="a", gold_doc_ids=["p-1", "p-2"])
    assert _gold_passages_read({"passages": ["p-1#0", "p-9#0", "p-1#1"]}, q) == 0.5  # chunks of one paragraph
    assert _gold_passages_read({"read": {"passages": ["p-2#0", "p-1#3"]}}, q) == 1.0  # memo_rag's reader
    assert _gold_passages_read({"steps": []}, q) is None  # a method that reads no passages
    row = {"em": 0.0, "f1": 0.0, "contains": 0.0, "memory_calls": 0, "latency_s": 1.0, "executive_tokens": 1,
           "judge": None}
    res = summarize([{**row, "method": "bm25", "gold_passages_read": 0.5},
                     {**row, "method": "bm25", "gold_passages_read": 1.0},
                     {**row, "method": "closed_book", "gold_passages_read": None}], ["bm25", "closed_book"], "musique", 2)
    assert res["methods"]["bm25"]["gold_passages_read"] == 0.75 and "gold_passages_read" not in res["methods"]["closed_book"]
    assert "gold paragraphs among the passages read: bm25 0.750" in markdown_table(res)


def test_bootstrap_interval_narrows_with_more_questions():
    from memo.evaluation.metrics import bootstrap_ci

    few, many = bootstrap_ci([1, 0, 1, 0, 1, 0, 1, 0]), bootstrap_ci([1, 0] * 200)
    assert few[0] < 0.5 < few[1] and many[0] < 0.5 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 3  # ~1/sqrt(n)
    assert bootstrap_ci([1, 1, 1]) == [1.0, 1.0] and bootstrap_ci([0.25, 0.75]) == bootstrap_ci([0.25, 0.75])


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "narrativeqa", "--methods", "memo_gold_decomp"], "needs MuSiQue's question_decomposition"),
    (["--benchmark", "musique", "--methods", "bm25,rag9"], "unknown rag9"),
    (["--benchmark", "musique", "--set", "pinning_turn=3"], "unknown key(s) pinning_turn; did you mean executive.pinning_turns"),
    (["--benchmark", "musique", "--set", "seeking_turns=0"], "seeking_turns=0: use 1 or more"),
    (["--benchmark", "musique", "--executive-url", "http://127.0.0.1:9/v1"], "go together"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    data = musique_file(tmp_path / "m.jsonl")
    res = run_cli("eval", "--data", str(data), "--out", str(tmp_path / "out"), *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_eval_builds_a_memory_per_seed_runs_every_method_and_resumes(tmp_path, tiny_model):
    """No --memory, --noise 1 --seeds 2: the noise records' paragraphs join the corpus; synthesize + train +
    register the corpus' memory, then all seven methods with a tiny model as executive, judge and base
    (results with intervals, the judge and its agreement with `contains`, the three diagnostics, table,
    chart, predictions, traces, MLflow); a second memory from the first's reflections with another seed,
    asked only the memo_* methods; one combined table. The same command again answers nothing twice;
    other settings into the same folder are refused; a registered memory is evaluated by its alias.
    (Several noise levels: the plan test above.)"""
    import mlflow
    from memo import registry
    from memo.evaluation.benchmarks import load_benchmark

    data, out = musique_file(tmp_path / "m.jsonl", noise_records=True), tmp_path / "out"
    methods = "closed_book,bm25,oracle,memo_single,memo_structured,memo_gold_decomp,memo_rag"
    memo_methods = [m for m in methods.split(",") if m.startswith("memo_")]
    args = ["eval", "--benchmark", "musique", "--data", str(data), "--limit", "2", "--distractors", "1",
            "--out", str(out), "--methods", methods, "--noise", "1", "--seeds", "2",
            "--domain", "evaltest", "--executive-local", tiny_model, "--set", f"base_model={tiny_model}",
            "--set", "epochs=1", "--set", "train.workers=1", "--set", "pinning_turns=2", "--set", "seeking_turns=2",
            "--set", "executive_max_tokens=24", "--set", "memory_max_tokens=12", "--set", "eval_sample=4"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]

    # seed 0: an ordinary `memo eval` run of every method
    seed0 = out / "runs" / "noise-1" / "seed-0"
    results = json.loads((seed0 / "results.json").read_text())
    assert results["benchmark"] == "musique" and results["n"] == 2 and results["errors"] == 0
    assert set(results["methods"]) == set(methods.split(","))
    for name, m in results["methods"].items():
        assert m["n"] == 2 and 0 <= m["em"] <= m["contains"] <= 1 and 0 <= m["f1"] <= 1 and m["latency_s_per_q"] > 0
        assert (m["memory_calls_per_q"] > 0) == name.startswith("memo_")
        assert m["f1_ci"][0] <= m["f1"] <= m["f1_ci"][1] and 0 <= m["judge"] <= 1
        assert 0 <= m["judge_agrees_with_contains"] <= 1
    d = results["diagnostics"]
    asked = list(map(json.loads, data.read_text().splitlines()))[:2]
    assert d["memory_recall"]["probes"] == sum(len(q["question_decomposition"]) for q in asked)
    assert 0 <= d["memory_recall"]["recall"] <= 1 and 0 <= d["reflections_recited"]["recited"] <= 1
    assert d["reflections_recited"]["asked"] > 0 and d["reflection_coverage"]["facts"] > 0
    assert results["methods"]["memo_gold_decomp"]["memory_calls_per_q"] >= 1
    assert results["memory"].startswith("models:/memo-evaltest/")
    table = (seed0 / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods.split(","))
    assert (seed0 / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len((seed0 / "predictions.jsonl").read_text().splitlines()) == 14
    structured = [json.loads(line) for line in (seed0 / "traces" / "memo_structured.jsonl").read_text().splitlines()]
    assert len(structured) == 2 and all(t["protocol"] == "structured" for t in structured)
    assert any(s["role"] == "state" for s in structured[0]["steps"])
    bm25 = json.loads((seed0 / "traces" / "bm25.jsonl").read_text().splitlines()[0])
    assert 0 < len(bm25["passages"]) <= results["documents"]
    # MLflow: the run and its metrics, and the memory registered for this corpus
    mlflow.set_tracking_uri(registry.tracking_uri())
    run = mlflow.get_run(results["mlflow_run_id"])
    assert run.data.metrics["memo_single.em"] == results["methods"]["memo_single"]["em"]

    # seed 1: another memory, trained on seed 0's reflections with another seed, asked the memo_* methods
    c = json.loads((out / "results.json").read_text())
    assert c["documents"]["noise-1"] > len(load_benchmark("musique", str(data), 2, 0.0, 1)[0])
    assert set(c["memories"]) == {"noise-1/seed-0", "noise-1/seed-1"}
    assert c["memories"]["noise-1/seed-0"] == results["memory"] != c["memories"]["noise-1/seed-1"]
    assert c["memories"]["noise-1/seed-1"].startswith("models:/memo-evaltest/")
    memo = c["methods"]["memo_gold_decomp"]["levels"]["noise-1"]
    assert memo["seeds"] == 2 and len(memo["f1_seeds"]) == 2 and "f1_sd" in memo
    assert c["methods"]["bm25"]["levels"]["noise-1"]["seeds"] == 1  # BM25 does not depend on the memory
    seed1 = json.loads((out / "runs" / "noise-1" / "seed-1" / "settings.json").read_text())["settings"]
    assert seed1["train"]["seed"] == 1 and seed1["eval"]["methods"] == memo_methods
    assert not (out / "runs" / "noise-1" / "seed-1" / "reflections").exists()
    combined = (out / "results.md").read_text()
    assert "| memo_gold_decomp | noise-1 |" in combined and "Per seed (F1)" in combined
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    # the same command again: nothing is answered twice
    again = run_cli(*args)
    assert again.returncode == 0 and "14 answers already in" in again.stdout, again.stdout[-2000:]
    assert again.stdout.count(" 0 to go") == 2, again.stdout[-2000:]
    assert len((seed0 / "predictions.jsonl").read_text().splitlines()) == 14
    assert json.loads((seed0 / "results.json").read_text())["methods"] == results["methods"]
    # other settings into the same folder: refused, nothing overwritten
    resumed = (out / "results.json").read_text()
    other = run_cli(*args, "--limit", "1")
    assert other.returncode == 2 and "other settings (eval.limit)" in other.stderr, other.stderr[-2000:]
    assert (out / "results.json").read_text() == resumed
    # a registered memory by alias, as a platform team evaluates a candidate (the last trained: seed 1's)
    by_alias = run_cli("eval", "--benchmark", "musique", "--data", str(data), "--limit", "2", "--out",
                       str(tmp_path / "alias"), "--methods", "memo_gold_decomp", "--memory",
                       "models:/memo-evaltest@candidate", "--executive-local", tiny_model,
                       "--set", "memory_max_tokens=12")
    assert by_alias.returncode == 0, by_alias.stderr[-2000:]
    assert json.loads((tmp_path / "alias" / "results.json").read_text())["memory"] == c["memories"]["noise-1/seed-1"]


def test_presets_size_a_run_and_flags_given_beside_win(tmp_path):
    from memo.cli import parse

    data = musique_file(tmp_path / "m.jsonl")
    base = ["eval", "--benchmark", "musique", "--data", str(data), "--out", str(tmp_path / "o")]
    _, cpu, _, _ = parse(base + ["--preset", "cpu"])
    assert (cpu.limit, cpu.distractors) == (24, 1) and "memo_structured" not in cpu.methods
    assert {"memo_single", "memo_rag", "memo_gold_decomp", "bm25", "oracle"} <= set(cpu.methods)
    _, mine, _, _ = parse(base + ["--preset", "cpu", "--limit", "6", "--methods", "bm25"])
    assert (mine.limit, mine.methods, mine.distractors) == (6, ["bm25"], 1)
    _, gpu, _, _ = parse(base + ["--preset", "gpu"])
    assert gpu.limit is None and "memo_structured" in gpu.methods


def test_noise_levels_must_differ_and_a_given_memory_cannot_be_retrained(tmp_path):
    data = musique_file(tmp_path / "m.jsonl")
    base = ["eval", "--benchmark", "musique", "--data", str(data), "--out", str(tmp_path / "o")]
    for args, message in ((["--noise", "0,1,0"], "noise 0,1,0: give each level once"),
                          (["--seeds", "3", "--memory", "models:/memo-x/1"], "drop memory / memory_url"),
                          (["--noise", "0,-1"], "--noise 0,-1: use 0.0 or more")):
        res = run_cli(*base, *args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def _fake_run(out, f1s: dict[str, list[float]], recall: float):
    """A finished single run as the sweep reads it: predictions.jsonl and the summarized results."""
    out.mkdir(parents=True)
    rows = [{"method": m, "qid": f"q{i}", "em": float(v == 1), "f1": v, "contains": float(v > 0), "judge": None,
             "memory_calls": 2 if m.startswith("memo_") else 0, "latency_s": 1.0, "executive_tokens": 10}
            for m, vals in f1s.items() for i, v in enumerate(vals)]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = summarize(rows, list(f1s), "musique", 4)
    return {**res, "documents": 10, "memory": "m", "errors": 0,
            "diagnostics": {"memory_recall": {"recall": recall}}}


def test_sweep_reports_the_paired_noise_drop_and_the_spread_over_seeds(tmp_path):
    from memo.config import EvalConfig
    from memo.evaluation.sweep import combine, markdown

    cfg = EvalConfig(benchmark="musique", data=str(musique_file(tmp_path / "m.jsonl")), out=str(tmp_path),
                     methods=["bm25", "memo_single"],
                     noise=[0, 1], seeds=2)
    runs = [
        {"noise": 0.0, "seed": 0, "out": tmp_path / "a",
         "results": _fake_run(tmp_path / "a", {"bm25": [1, 1, 0.5, 0], "memo_single": [1, 0, 0, 0]}, 0.5)},
        {"noise": 0.0, "seed": 1, "out": tmp_path / "b", "results": _fake_run(tmp_path / "b", {"memo_single": [1, 1, 0, 0]}, 0.7)},
        {"noise": 1.0, "seed": 0, "out": tmp_path / "c",
         "results": _fake_run(tmp_path / "c", {"bm25": [0, 1, 0.5, 0], "memo_single": [1, 0, 0, 0]}, 0.4)},
        {"noise": 1.0, "seed": 1, "out": tmp_path / "d", "results": _fake_run(tmp_path / "d", {"memo_single": [0, 0, 0, 0]}, 0.2)},
    ]
    c = combine(cfg, runs)
    bm25, memo = c["methods"]["bm25"], c["methods"]["memo_single"]
    # BM25 lost question q0 at noise 1: -0.25 on average, paired over the same four questions
    assert bm25["f1_change_vs_first"]["noise-1"]["f1_change"] == -0.25
    lo, hi = bm25["f1_change_vs_first"]["noise-1"]["f1_change_ci"]
    assert lo <= -0.25 <= hi and hi <= 0
    assert bm25["levels"]["noise-0"]["f1"] == 0.625 and "f1_ci" in bm25["levels"]["noise-0"]  # one run: its CI
    # MeMo: the mean over two seeds, their values and sd; the drop is seed 0's (paired), here none
    assert memo["levels"]["noise-0"]["f1_seeds"] == [0.25, 0.5] and memo["levels"]["noise-0"]["f1"] == 0.375
    assert memo["levels"]["noise-0"]["f1_sd"] == pytest.approx(0.1768, abs=1e-4)
    assert memo["f1_change_vs_first"]["noise-1"]["f1_change"] == 0.0
    assert c["memory_recall"]["noise-0"] == {"recall": 0.6, "seeds": [0.5, 0.7], "sd": pytest.approx(0.1414, abs=1e-4)}
    table = markdown(c)
    assert "| bm25 | 0.625 [" in table and "-0.250 [" in table
    assert "| memo_single | noise-0 | 0.250 | 0.500 | 0.375 | 0.177 | 0.250 |" in table
    assert "| memory recall | noise-1 | 0.400 | 0.200 |" in table
    # every row has as many cells as the header, with one noise level as with two
    for sweep in (c, combine(cfg.model_copy(update={"noise": [0.0]}), runs[:2])):
        rows = [line for line in markdown(sweep).splitlines() if line.startswith("| ")]
        head = rows[0]
        assert "|  " not in head and all(r.count("|") == head.count("|") for r in rows[1:] if r.startswith("| bm25"))


def test_sweep_plans_a_memory_per_level_and_seed_and_the_others_once(tmp_path):
    """--noise 0,1 --seeds 2: each level is its own domain (a noisier corpus is another memory); seed k>0
    trains on seed 0's reflections with train.seed+k and runs only the memo_* methods; then one combined
    result. The runs are recorded here, not executed (the end-to-end test above runs one level)."""
    from memo.config import EvalConfig, ExecutiveConfig
    from memo.evaluation.sweep import run_sweep

    cfg = EvalConfig(benchmark="musique", data=str(musique_file(tmp_path / "m.jsonl")), out=str(tmp_path / "o"),
                     methods=["bm25", "memo_gold_decomp"], noise=[0, 1], seeds=2, domain="plan")
    calls = []

    def run_one(sub, exec_cfg, train, synth, reflections=None):
        calls.append((sub.noise, sub.domain, sub.methods, train.get("seed"), reflections))
        return _fake_run(Path(sub.out), {m: [1, 0, 1, 0] for m in sub.methods}, 0.5)

    c = run_sweep(cfg, ExecutiveConfig(), {"seed": 3}, {}, run_one)
    runs = tmp_path / "o" / "runs"
    assert calls == [
        ([0.0], "plan-noise0", ["bm25", "memo_gold_decomp"], 3, None),
        ([0.0], "plan-noise0", ["memo_gold_decomp"], 4, runs / "noise-0" / "seed-0" / "reflections"),
        ([1.0], "plan-noise1", ["bm25", "memo_gold_decomp"], 3, None),
        ([1.0], "plan-noise1", ["memo_gold_decomp"], 4, runs / "noise-1" / "seed-0" / "reflections")]
    assert c["methods"]["bm25"]["levels"]["noise-1"]["seeds"] == 1
    assert c["methods"]["memo_gold_decomp"]["levels"]["noise-1"]["seeds"] == 2
    assert json.loads((tmp_path / "o" / "results.json").read_text())["seeds"] == 2


def test_memory_recall_tells_echoes_from_abstentions_and_wrong_answers():
    from memo.evaluation.benchmarks import Question
    from memo.evaluation.diagnostics import memory_recall
    from memo.text import adds_nothing

    assert adds_nothing("What was the name of Frankie Ryan's friend Jeff?", "Jeff's name was Jeff.")
    assert adds_nothing("What is the employer of Ernst Mach?", "The employer of Ernst Mach named after Ernst Mach.")
    assert not adds_nothing("Who runs the station?", "Rita Wilson runs the station.")
    assert not adds_nothing("Who runs the station?", "I don't know.")  # an abstention, not an echo

    class Memory:
        answers = {"Who founded the Orrin Light?": "Mara Quill founded the Orrin Light.",
                   "Where was Mara Quill born?": "Mara Quill was born where Mara Quill was born.",
                   "Which river runs past Harlow?": "I don't know.", "Who keeps Harlow?": "Tess Vane keeps it."}

        def ask(self, questions):
            return [self.answers[q] for q in questions]

    qs = [Question("1", "Where was the founder of the Orrin Light born?", "Vennick",
                   decomposition=[{"question": "Who founded the Orrin Light?", "answer": "Mara Quill"},
                                  {"question": "Where was #1 born?", "answer": "Vennick"}]),
          Question("2", "Which river runs past Harlow?", "the Sable"), Question("3", "Who keeps Harlow?", "Ivo Lark")]
    r = memory_recall(qs, Memory())
    assert r["probes"] == 4 and r["recall"] == 0.25 and r["by_hop"] == {"hop1": 0.333, "hop2": 0.0}
    assert r["misses"] == {"echo": 0.25, "idk": 0.25, "wrong": 0.25}
