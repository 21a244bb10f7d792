"""The LLM generator: parsing, verification loop, dedup, grouping and engines with scripted replies (fast),
then the five-step pipeline through the real http engine and Ray Data against a scripted OpenAI-compatible
server on loopback: six step kinds, a malformed row in rejects, resume without repeated work (slow)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from llm_stub import StubLLM
from memo.engines import Reply
from memo.errors import MemoError
from memo.synthesis.dedup import near_duplicates
from memo.synthesis.groups import form_groups
from memo.synthesis.llm.worker import StepWorker

CHUNK = {"chunk_id": "d1#0", "doc_id": "d1", "title": "Tessel Island", "doc_date": "2020-01-01",
         "text": "Tessel Island has a lighthouse. Mara Quill keeps it. It was built in 1881."}


class Scripted:
    """An in-process engine whose replies come from a list (or a function of the prompt)."""

    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def chat(self, batch, max_tokens, temperature, json_mode=False):
        out = []
        for msgs in batch:
            self.prompts.append(msgs[-1]["content"])
            r = self.replies(msgs[-1]["content"]) if callable(self.replies) else self.replies.pop(0)
            out.append(r if isinstance(r, Reply) else Reply(r, "", 10, len(r.split())))
        return out


def worker(step, engine, **kw):
    return StepWorker(step=step, engine=engine, max_tokens=64, temperature=0.0, json_retries=kw.pop("json_retries", 1),
                      **kw)


def run(w, rows):
    return w(pd.DataFrame(rows)).to_dict("records")


def test_extract_repairs_json_and_rejects_what_cannot_be_parsed():
    eng = Scripted(["```json\n{'pairs': [{'question': 'Who keeps the Tessel Island lighthouse?', "
                    "'answer': 'Mara Quill keeps it.'},]}\n```",  # fenced, single quotes, trailing comma
                    "I cannot do that.", Reply(error="engine_error: APIConnectionError after 4 attempt(s)"),
                    "Still no JSON here."])  # round 2: the one re-ask of the second row, then a reject
    rows = [{**CHUNK, "pass": "direct", "input_id": "a"}, {**CHUNK, "pass": "indirect", "input_id": "b"},
            {**CHUNK, "pass": "direct", "input_id": "c"}]
    out = run(worker("extract", eng), rows)
    by = {r["input_id"]: r for r in out}
    assert by["a"]["status"] == "ok" and by["a"]["question"] == "Who keeps the Tessel Island lighthouse?"
    assert by["a"]["source_chunk_ids"] == ["d1#0"] and by["a"]["kind"] == "direct"
    assert by["b"]["status"] == "reject" and by["b"]["reason"] == "bad_json" and by["b"]["calls"] == 2
    assert "no JSON" in by["b"]["raw"]
    assert by["c"]["status"] == "reject" and by["c"]["reason"].startswith("engine_error")
    assert "valid JSON" in eng.prompts[3]  # the re-ask says what was wrong


def test_over_long_chunk_is_rejected_without_calling_the_engine():
    eng = Scripted([])
    out = run(worker("extract", eng, max_chunk_tokens=5), [{**CHUNK, "pass": "direct", "input_id": "a"}])
    assert out[0]["status"] == "reject" and out[0]["reason"].startswith("too_long") and eng.prompts == []


def test_verification_rewrites_then_accepts_and_gives_up_after_the_budget():
    def judge(prompt):
        if "fails the stand-alone check" in prompt:
            return json.dumps({"question": "When was the Tessel Island lighthouse built?",
                               "answer": "The Tessel Island lighthouse was built in 1881."})
        return json.dumps({"ok": "Tessel" in prompt.split("\n")[0], "violations": [] if "Tessel" in prompt.split("\n")[0]
                           else ["unresolved_pronoun"]})

    pair = {**CHUNK, "kind": "direct", "source_chunk_ids": ["d1#0"], "merged_from": []}
    eng = Scripted(judge)
    out = run(worker("verify", eng), [{**pair, "input_id": "p", "question": "When was it built?", "answer": "In 1881."}])
    assert out[0]["status"] == "ok" and out[0]["verified"] and out[0]["kind"] == "rewritten"
    assert out[0]["question"] == "When was the Tessel Island lighthouse built?" and out[0]["calls"] == 3

    never = Scripted(lambda p: json.dumps({"ok": False, "violations": ["missing_context"]}) if "stand alone" in p
                     else json.dumps({"question": "When was it built again?", "answer": "In 1881."}))
    out = run(worker("verify", never, verify_attempts=5), [{**pair, "input_id": "q", "question": "When was it built?",
                                                            "answer": "In 1881."}])
    assert out[0]["status"] == "reject" and out[0]["reason"].startswith("unverified after 5 attempt(s)")
    assert out[0]["calls"] == 5 + 4  # five judgements, four rewrites in between

    # The rule floor: a judge that says ok does not pass a pair that starts with a pronoun.
    lenient = Scripted(lambda p: json.dumps({"ok": True}) if "stand alone" in p else "no json")
    out = run(worker("verify", lenient, verify_attempts=2, json_retries=0),
              [{**pair, "input_id": "r", "question": "It was built when?", "answer": "It was built in 1881."}])
    assert out[0]["status"] == "reject" and "pronoun" in out[0]["reason"]


def test_entity_questions_must_not_name_the_entity_and_answers_must():
    reply = json.dumps({"entities": [{"name": "Mara Quill", "questions": [
        {"kind": "one_fact", "question": "Who keeps the Tessel Island lighthouse?", "answer": "Mara Quill keeps it."},
        {"kind": "two_facts", "question": "Who is Mara Quill, keeper of a lighthouse?", "answer": "Mara Quill."},
        {"kind": "relation", "question": "Who keeps the lighthouse built in 1881?", "answer": "A keeper."}]}]})
    out = run(worker("entity", Scripted([reply])), [{**CHUNK, "input_id": "d1#0"}])
    assert [(r["kind"], r["status"], r["reason"]) for r in out] == [
        ("one_fact", "ok", ""), ("two_facts", "reject", "question_names_the_entity"),
        ("relation", "reject", "answer_does_not_name_the_entity")]


def test_consolidation_records_merged_pairs_and_cross_doc_needs_two_documents():
    pairs = [{"pair_id": f"id{i}", "question": f"Q{i} about Tessel Island?", "answer": f"A{i}.",
              "source_chunk_ids": [f"d1#{i % 2}"]} for i in range(3)]
    reply = json.dumps({"composites": [{"merged": ["p1", "p3"], "question": "What are two facts about Tessel Island?",
                                        "answer": "A0 and A2."}, {"merged": ["p9"], "question": "Bad merge here?",
                                                                  "answer": "x"}]})
    out = run(worker("consolidate", Scripted([reply])),
              [{"input_id": "d1", "title": "Tessel Island", "pairs": pairs, "chunk_ids": ["d1#0", "d1#1"]}])
    assert out[0]["status"] == "ok" and out[0]["merged_from"] == ["id0", "id2"] and out[0]["kind"] == "composite_2"
    assert out[1]["status"] == "reject" and out[1]["reason"] == "merged_fewer_than_2_pairs"

    docs = [{"chunk_id": f"d{i}#0", "title": f"T{i}", "text": "x.", "doc_date": ""} for i in range(3)]
    reply = json.dumps({"questions": [
        {"kind": "converging", "question": "Which island do T0 and T2 both describe?", "answer": "Tessel.",
         "documents": [1, 3]},
        {"kind": "parallel", "question": "Which islands have lighthouses?", "answer": "Tessel.", "documents": [2]}]})
    out = run(worker("cross_doc", Scripted([reply])),
              [{"input_id": "g", "why": "w", "docs": docs, "chunk_ids": [d["chunk_id"] for d in docs], "text": "x"}])
    assert out[0]["status"] == "ok" and out[0]["source_chunk_ids"] == ["d0#0", "d2#0"]
    assert out[1]["status"] == "reject" and out[1]["reason"] == "fewer_than_2_documents"


def test_near_duplicates_drop_rewordings_but_keep_different_facts():
    qs = ["Who founded the Halvenmere Cooperative in the year 1990?",
          "Who founded the Halvenmere Cooperative in the year 1990 ?",   # punctuation only
          "Who founded the Halvenmere Cooperative in the year 1990, exactly?",
          "Who was born in the town of Lyon in the year 1950?",
          "Who was born in the town of Lyon in the year 1950?!",          # same question, other answer
          "Where does the Halvenmere Cooperative have its headquarters?"]
    ans = ["Ysolde Marrowfen founded it.", "Ysolde Marrowfen founded it.", "Ysolde Marrowfen founded it in 1990.",
           "Ada Brenn was born there.", "Odo Quist was born there.", "In Quillstead."]
    assert near_duplicates(qs, ans, 0.8) == [1, 2]
    assert near_duplicates(qs, None, 0.8) == [1, 2, 4]
    assert near_duplicates(qs, ans, 1.0) == []


def test_pair_shape_checks():
    from memo.synthesis.llm.rows import check_pair

    assert check_pair("Who keeps the Orrin Light?", "Mara Quill.") == ""
    assert check_pair("Anna Benson", "Kris Benson") == "not_a_question"
    assert check_pair("Who is the subject of this JSON?", "Benson") == "mentions_the_prompt"
    assert check_pair("Who keeps the Orrin Light?", "") == "empty_field"
    assert check_pair("Who keeps the Orrin Light?", "who keeps the orrin light?") == "answer_repeats_question"


def test_groups_come_from_shared_names_then_bm25_neighbours():
    chunks = pd.DataFrame([
        {"chunk_id": "a#0", "doc_id": "a", "title": "Orrin Light", "domain": "t", "doc_date": "",
         "text": "The Orrin Light stands on Tessel Island. Mara Quill keeps it."},
        {"chunk_id": "b#0", "doc_id": "b", "title": "Quill family", "domain": "t", "doc_date": "",
         "text": "Mara Quill was born in Vennick. She trained as a keeper."},
        {"chunk_id": "c#0", "doc_id": "c", "title": "Ferries", "domain": "t", "doc_date": "",
         "text": "ferries leave the harbour for the island every morning and the lighthouse keeper waves."},
        {"chunk_id": "d#0", "doc_id": "d", "title": "Weather", "domain": "t", "doc_date": "",
         "text": "storms close the harbour; ferries wait and the island keeper lights the lamp."}])
    groups, report = form_groups(chunks, group_size=3, group_by="entities+bm25")
    by_how = {}
    for g in groups:
        by_how.setdefault(g["how"], []).append(set(g["doc_ids"]))
    assert {"a", "b"} in by_how["entities"] and "Mara Quill" in groups[0]["why"]
    assert any({"c", "d"} <= s for s in by_how["bm25"])
    assert report["by_method"]["entities"] >= 1 and report["documents_in_a_group"] == 4
    only, rep = form_groups(chunks, group_size=2, group_by="entities")
    assert all(g["how"] == "entities" for g in only) and rep["groups"] == len(only)
    assert form_groups(chunks.head(1))[0] == []


def test_http_engine_retries_server_errors_and_does_not_retry_client_errors():
    from memo.engines.http import HttpEngine

    msgs = [[{"role": "user", "content": "Merge pairs that share\np1. Q: a A: b"}]]
    with StubLLM(fail_first=2) as llm:
        r = HttpEngine(llm.url, "m", retries=3).chat(msgs, 16, 0.0)[0]
        assert r.error == "" and "composites" in r.text and llm.requests == 3 and r.completion_tokens > 0
    with StubLLM(fail_first=9, status=503) as llm:
        r = HttpEngine(llm.url, "m", retries=2).chat(msgs, 16, 0.0)[0]
        assert r.error.startswith("engine_error") and "3 attempt" in r.error and llm.requests == 3
    with StubLLM(fail_first=9, status=401) as llm:
        r = HttpEngine(llm.url, "m", retries=3).chat(msgs, 16, 0.0)[0]
        assert "HTTP 401" in r.error and llm.requests == 1
    with StubLLM(delay=2.0) as llm:
        r = HttpEngine(llm.url, "m", retries=0, timeout=0.3).chat(msgs, 16, 0.0)[0]
        assert r.error.startswith("engine_error: APITimeoutError")


def test_http_engine_waits_as_long_as_retry_after_says():
    """A 429 with Retry-After (what this project's own router sends) is retried after that many seconds,
    not after the SDK's own sub-second backoff."""
    import time

    from memo.engines.http import HttpEngine

    msgs = [[{"role": "user", "content": "Merge pairs that share\np1. Q: a A: b"}]]
    with StubLLM(fail_first=1, status=429, retry_after=2) as llm:
        t0 = time.monotonic()
        r = HttpEngine(llm.url, "m", retries=1).chat(msgs, 16, 0.0)[0]
        waited = time.monotonic() - t0
    assert r.error == "" and llm.requests == 2 and waited >= 1.9


def test_hf_engine_generates_counts_tokens_and_refuses_over_long_prompts(tiny_model):
    from memo.engines.hf import HfEngine

    eng = HfEngine(tiny_model, threads=1, max_prompt_tokens=200)
    short = [{"role": "user", "content": "Tessel Island has a lighthouse."}]
    long = [{"role": "user", "content": "Tessel Island has a lighthouse. " * 80}]
    ok, too_long, ok2 = eng.chat([short, long, short], max_tokens=8, temperature=0.0)
    assert ok.error == "" and ok.prompt_tokens > 5 and ok.text == ok2.text  # greedy: same prompt, same reply
    assert too_long.error.startswith("too_long") and too_long.text == ""
    # the whole extract step on a local model: a random model writes no JSON, so the rows are rejects
    eng.max_prompt_tokens = 512  # the tiny model's positions: the instructions alone are ~480 tokens
    out = run(StepWorker("extract", eng, 8, 0.0, 0), [{**CHUNK, "text": "Tessel Island.", "pass": "direct",
                                                        "input_id": "a"}])
    assert out[0]["status"] == "reject" and out[0]["reason"] == "bad_json" and out[0]["calls"] == 1


def test_generator_config_errors_say_how_to_fix():
    from memo.config import SynthesizeConfig, build_config

    base = {"domain": "d", "corpus": "c.jsonl", "out": "o"}
    with pytest.raises(MemoError, match="--base-url"):
        build_config(SynthesizeConfig, {**base, "generator": "http"})
    with pytest.raises(MemoError, match="use 'rules', 'llamacpp', 'hf', 'http' or 'vllm'"):
        build_config(SynthesizeConfig, {**base, "generator": "gpt"})
    with pytest.raises(MemoError, match="group_by"):
        build_config(SynthesizeConfig, {**base, "group_by": "gold"})
    with pytest.raises(MemoError, match="group_size"):
        build_config(SynthesizeConfig, {**base, "group_size": 1})


def test_vllm_generator_without_vllm_is_a_clear_error():
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis.llm.pipeline import start_vllm_generator

    pytest.importorskip("ray")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed: this checks the message on machines without it")
    except ImportError:
        pass
    cfg = build_config(SynthesizeConfig, {"domain": "d", "corpus": "c", "out": "o", "generator": "vllm",
                                          "model": "Qwen/Qwen2.5-0.5B-Instruct"})
    with pytest.raises(MemoError, match="vLLM is not importable"):
        start_vllm_generator(cfg)


# ---------------------------------------------------------------------------------------------------
# The whole pipeline, through Ray Data and the http engine.

DOCS = [
    {"id": "orrin", "title": "Orrin Light", "date": "2021-05-01",
     "text": "The Orrin Light stands on Tessel Island. Mara Quill has kept the Orrin Light since 1990. "
             "The Orrin Light was built in 1881. Its lamp can be seen from 20 kilometres."},
    {"id": "quill", "title": "Mara Quill", "date": "2021-05-02",
     "text": "Mara Quill was born in Vennick in 1962. Mara Quill trained as a keeper in Harlow. "
             "Mara Quill wrote a book about storms."},
    {"id": "fixme", "title": "FIXME Vennick Harbour", "date": "2021-05-03",
     "text": "Vennick Harbour lies east of Tessel Island. Ferries from Vennick Harbour reach Tessel Island daily. "
             "Vennick Harbour was dredged in 2004."},
    {"id": "bad", "title": "Storm log", "date": "2021-05-04",
     "text": "GARBLE GARBLE. The storm log is unreadable. Nothing else survives."},
]


@pytest.mark.slow
def test_pipeline_through_http_engine_six_kinds_rejects_and_resume(ray_local, tmp_path):
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize
    from memo.synthesis.schema import STEPS

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "refl"
    with StubLLM() as llm:
        cfg = build_config(SynthesizeConfig, {"domain": "isles", "corpus": str(corpus), "out": str(out),
                                              "generator": "http", "base_url": llm.url, "model": "scripted",
                                              "workers": 2, "batch_size": 2, "abstain_ratio": 0.2, "retries": 1})
        stats = synthesize(cfg)
        first = llm.requests
        df = pd.read_parquet(out / "reflections.parquet")
        rejects = pd.read_parquet(out / "rejects.parquet")
        # all six step kinds, from the real prompts' replies
        assert set(STEPS) <= set(df.step), stats["per_step"]
        assert (df.generator == "http:scripted").all() and df.id.is_unique
        # consolidated rows name the verified pairs they merge
        merged = [list(m) for m in df[df.step == "consolidated"].merged_from]
        assert merged and all(len(m) >= 2 and set(m) <= set(df.id) for m in merged), (merged, stats["duplicates"])
        # the malformed document is in the rejects with its reason and the reply; the job finished
        bad = rejects[rejects.reason == "bad_json"]
        assert len(bad) >= 3 and all("bad#0" in list(ids) for ids in bad.source_chunk_ids)
        assert bad.raw.str.contains("no JSON").all() and {"bad#0|direct", "bad#0|indirect"} <= set(bad.input_id)
        assert {"question_names_the_entity", "fewer_than_2_documents", "merged_fewer_than_2_pairs"} <= set(rejects.reason)
        # pairs whose answer only restates the question never reach verification or the memory
        echoes = rejects[rejects.reason == "answer_adds_nothing"]
        assert len(echoes) == stats["steps"]["extract"]["echoes"] >= 2
        assert not df.answer.str.contains("'s name is").any()
        # verification rewrote the FIXME pairs instead of dropping them
        checked = df[df.step.isin(["direct", "indirect", "consolidated"])]
        assert checked.verified.all() and not checked.question.str.contains("FIXME").any()
        assert checked.question.str.contains("Vennick Harbour").any()
        # every input is accounted for: in = inputs that gave pairs + rejected-only + empty
        st = stats["steps"]
        assert st["extract"]["in"] == 2 * stats["chunks"] and st["extract"]["rejected"] >= 2
        assert st["verify"]["out"] + st["verify"]["rejected"] == st["verify"]["in"]
        assert stats["groups"]["groups"] >= 1 and "entities" in stats["groups"]["by_method"]
        assert stats["throughput"]["engine_calls"] == first
        # a re-run with the finished output does nothing
        synthesize(cfg)
        assert llm.requests == first
        # an interrupted run (stats and one step's last part gone) redoes only that part's inputs
        (out / "stats.json").unlink()
        parts = sorted((out / "steps").glob("*/entity/part-*.parquet"))
        lost = int(pd.read_parquet(parts[-1])["calls"].sum())
        parts[-1].unlink()
        again = synthesize(cfg)
        assert llm.requests - first == lost
        assert again["dataset_hash"] == stats["dataset_hash"]


def _gpu_vllm() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means: not here
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _gpu_vllm() or not __import__("os").environ.get("MEMO_TEST_VLLM_MODEL"),
                    reason="needs vLLM, a GPU and MEMO_TEST_VLLM_MODEL (a local model folder)")
def test_vllm_generator_on_a_gpu(ray_local, tmp_path):
    import os

    from conftest import DEMO_CORPUS
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize

    cfg = build_config(SynthesizeConfig, {"domain": "demo", "corpus": str(DEMO_CORPUS), "out": str(tmp_path / "r"),
                                          "generator": "vllm", "model": os.environ["MEMO_TEST_VLLM_MODEL"],
                                          "workers": 1})
    stats = synthesize(cfg)
    assert stats["rows"] > 0 and stats["steps"]["extract"]["calls"] >= 2 * stats["chunks"]


@pytest.mark.slow
def test_a_prompt_or_model_change_never_reuses_or_overwrites_reflections(ray_local, tmp_path, monkeypatch):
    """Default output folders are named by the resume key: another generator model writes a new folder
    and leaves the first one's reflections (which a memory's lineage may point at) byte for byte; the same
    settings reuse without a request; a prompt-version bump re-runs; an explicit --out holding other
    settings is refused."""
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize
    from memo.synthesis.llm.pipeline import LLMGenerator

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS[:2]))
    with StubLLM() as llm:
        base = {"domain": "isles", "corpus": str(corpus), "generator": "http", "base_url": llm.url, "workers": 1,
                "batch_size": 4, "retries": 0}
        first = synthesize(build_config(SynthesizeConfig, {**base, "model": "model-a"}))
        kept = (Path(first["out"]) / "reflections.parquet").read_bytes()
        second = synthesize(build_config(SynthesizeConfig, {**base, "model": "model-b"}))
        assert second["out"] != first["out"] and second["resume_key"] != first["resume_key"]
        assert (Path(first["out"]) / "reflections.parquet").read_bytes() == kept
        asked = llm.requests
        again = synthesize(build_config(SynthesizeConfig, {**base, "model": "model-a"}))
        assert again["out"] == first["out"] and llm.requests == asked  # nothing to do
        monkeypatch.setattr(LLMGenerator, "version", "prompts-changed")
        bumped = synthesize(build_config(SynthesizeConfig, {**base, "model": "model-a"}))
        assert bumped["out"] not in (first["out"], second["out"]) and llm.requests > asked
        with pytest.raises(MemoError, match="other settings"):
            synthesize(build_config(SynthesizeConfig, {**base, "model": "model-b", "out": first["out"]}))
    assert (Path(first["out"]) / "reflections.parquet").read_bytes() == kept


def test_broken_json_still_yields_the_pairs_it_spells_out_whole():
    from memo.llm_json import salvage_pairs

    raw = ('JSON:\n{\n"pairs": [{"question": "What is the Boeing VC-25?", "answer": "A \\"jumbo\\" jet"}},\n{\n"pairs": '
           '[{"question": "What is the Boeing VC-25?", "answer": "A \\"jumbo\\" jet"}},\n{"question": "Who flies it?", '
           '"answer": "The US Air')
    assert salvage_pairs(raw) == [{"question": "What is the Boeing VC-25?", "answer": 'A "jumbo" jet'}]
    out = run(worker("extract", Scripted([raw]), json_retries=0), [{**CHUNK, "pass": "direct", "input_id": "a"}])
    assert [(r["status"], r["answer"]) for r in out] == [("ok", 'A "jumbo" jet')]
    out = run(worker("extract", Scripted(["no pairs at all"]), json_retries=0), [{**CHUNK, "pass": "direct",
                                                                               "input_id": "b"}])
    assert [(r["status"], r["reason"]) for r in out] == [("reject", "bad_json")]


def test_groups_are_the_same_on_every_run():
    """Resume depends on it: a group's id is its input id."""
    chunks = pd.DataFrame([{"chunk_id": f"{c}#0", "doc_id": c, "title": c, "domain": "t", "doc_date": "",
                            "text": t} for c, t in [("a", "red boats sail at dawn"), ("b", "red boats rest at dusk"),
                                                    ("c", "zzz"), ("d", "qqq"), ("e", "www")]])
    # Ray Data hands the chunks over in any order: shuffled input must give the same groups
    runs = [[g["group_id"] for g in form_groups(chunks.sample(frac=1, random_state=k), group_size=3,
                                                group_by="entities+bm25")[0]] for k in range(5)]
    assert all(r == runs[0] for r in runs) and runs[0]
    groups, _ = form_groups(chunks, group_size=3, group_by="bm25")
    assert all(set(g["doc_ids"]) <= {"a", "b"} for g in groups)  # no neighbour without a shared word


def test_the_vllm_generator_app_fetches_what_is_not_cached_and_splits_big_models(tmp_path, monkeypatch):
    """The job runs offline (HF_HUB_OFFLINE=1) and Serve passes that on: the generator replicas get their own
    environment, online for an HF id not in the cache (on the shared volume), offline for a local folder;
    tensor/pipeline parallelism and the context reach vLLM's engine arguments."""
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis.llm.pipeline import vllm_generator_config

    monkeypatch.delenv("HF_HOME", raising=False)
    cfg = build_config(SynthesizeConfig, {"domain": "d", "corpus": "c", "generator": "vllm",
                                          "model": "Qwen/Qwen2.5-32B-Instruct", "tensor_parallel_size": 2})
    c = vllm_generator_config(cfg)
    assert c["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "0"
    assert c["runtime_env"]["env_vars"]["HF_HOME"].startswith(os.environ["MEMO_HOME"])
    assert c["engine_kwargs"] == {"max_model_len": 3000 * 2 + 512, "tensor_parallel_size": 2, "pipeline_parallel_size": 1}
    local = vllm_generator_config(cfg.model_copy(update={"model_source": str(tmp_path)}))
    assert local["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert local["model_loading_config"] == {"model_id": "Qwen/Qwen2.5-32B-Instruct", "model_source": str(tmp_path)}
