"""The whole loop on a real local Ray cluster with a tiny model: synthesize (Ray Data) -> train
(Ray Train, 2 FSDP2 workers on gloo, one of them killed mid-run and restarted from the last sharded
checkpoint; the epoch chosen on held-out rewordings) -> MLflow registry -> Ray Serve router over real HTTP on
127.0.0.1 -> the official openai client and the executive, here and served (model memo/e2e, with
Qwen2.5-Coder-0.5B on llama.cpp as the served executive when make install has put it there)."""

import json

import httpx
import pytest
from conftest import DEMO_CORPUS, free_port

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def trained(ray_local, tiny_model, tmp_path_factory):
    """The demo corpus synthesized (Ray Data) and trained by 2 FSDP workers (Ray Train) that choose the
    epoch on held-out rewordings (select_on=heldout_recall, at most 3 epochs). Rank 0's process is killed
    two steps past the first checkpoint of epoch 2 (tests/faults.py) with no restarts left, so the run
    fails; the same settings on 1 worker then continue it from that checkpoint. Trained before Serve holds
    any CPU. Returns the second run's result, the reflections, the fault's marker, the first run's MLflow
    run id and the shard files of its last checkpoint."""
    from faults import dies_after_a_checkpoint_in_epoch_two
    from memo.config import SynthesizeConfig, TrainConfig, build_config, memo_home
    from memo.synthesis import synthesize
    from memo.training import stage, train

    out = tmp_path_factory.mktemp("refl")
    synthesize(build_config(SynthesizeConfig, {"domain": "e2e", "corpus": str(DEMO_CORPUS), "out": str(out)}))
    cfg = build_config(TrainConfig, {"domain": "e2e", "reflections": str(out), "base_model": tiny_model,
                                     "workers": 2, "lr": 3e-3, "eval_sample": 4, "checkpoint_every": 4,
                                     "select_on": "heldout_recall", "max_epochs": 3, "patience": 2,
                                     "max_failures": 0})
    marker = tmp_path_factory.mktemp("fault") / "died"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "train_loop_per_worker", dies_after_a_checkpoint_in_epoch_two(str(marker)))
        started = set(registry_runs())
        with pytest.raises(Exception):  # rank 0 died, no restart left: the run fails, its checkpoints stay
            train(cfg)
        (first_run,) = set(registry_runs()) - started
        (run_dir,) = memo_home().glob("ray_results/memo-e2e-*")
        last = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
        shards = sorted(p.name for p in (last / "shards").iterdir())
        result = train(cfg.model_copy(update={"workers": 1}))
    return result, out, marker, first_run, shards


def registry_runs() -> list[str]:
    """The MLflow run ids of the e2e domain's experiment."""
    from memo import registry

    c = registry.client()
    exp = c.get_experiment_by_name("memo-e2e")
    return [r.info.run_id for r in c.search_runs([exp.experiment_id])] if exp else []


def test_training_registers_a_candidate_with_lineage(trained):
    from memo import registry
    from memo.models import read_manifest

    result, refl, *_ = trained
    assert result["version"] == registry.resolve_version("e2e", "candidate")
    manifest = read_manifest(result["model_dir"])
    stats = json.loads((refl / "stats.json").read_text())
    assert manifest["corpus_hash"] == stats["corpus_hash"]
    assert manifest["reflections_hash"] == stats["dataset_hash"]
    assert manifest["reflection_rows"] == stats["rows"]
    # the run that finished it: 1 worker, from the step the interrupted 2-worker run had checkpointed
    assert manifest["training_config"]["workers"] == 1 and manifest["resumed_from_step"] == result["resumed_from_step"] > 0
    # the planned number of optimizer steps ran
    assert result["step"] == manifest["training_config"]["total_steps"]
    c = registry.client()
    mv = c.get_model_version("memo-e2e", result["version"])
    assert mv.tags["memo.corpus_hash"] == stats["corpus_hash"]
    history = c.get_metric_history(result["run_id"], "loss")
    assert len(history) == result["step"] - result["resumed_from_step"]
    # the reflections are the run's MLflow dataset input, with the synthesize stage's counts beside them
    run = c.get_run(result["run_id"])
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "reflections-e2e" and inp.dataset.digest == stats["dataset_hash"][:36]
    assert run.data.metrics["synth.rows.direct"] == stats["per_step"]["direct"]
    assert run.data.metrics["synth.cross_doc.out"] == stats["steps"]["cross_doc"]["out"]
    assert history[-1].value < history[0].value  # it learned something


def test_a_run_killed_on_two_workers_goes_on_on_one_with_the_same_steps_and_keeps_the_best_epoch(trained):
    """2 FSDP workers, select_on=heldout_recall: a selection set of rewordings (apart from the gate's held-out
    set) is asked after every epoch. Rank 0's process exits two steps past a checkpoint of epoch 2 with no
    restart left; `memo train` with the same settings on 1 worker continues the run from that checkpoint
    (model and optimizer shards read for 1 worker, scheduler, data position, the scores so far and the best
    epoch's weights) and trains the same steps the 2 workers would have: the two steps trained twice have the
    same loss. Training stops `patience` epochs after the best one, and the best epoch's weights are what
    is exported."""
    import torch
    import torch.distributed.checkpoint as dcp
    from faults import SCORES, STEPS_AFTER_CHECKPOINT
    from memo import registry
    from memo.config import memo_home
    from memo.models import load_model, read_manifest
    from memo.training.selection import EpochSelection

    result, _, died, first_run, first_shards = trained
    assert died.exists()  # the fault happened
    m = read_manifest(result["model_dir"])
    assert m["selection_rows"] > 0 and m["heldout_rows"] > 0
    c = registry.client()
    first = {x.step: x.value for x in c.get_metric_history(first_run, "loss")}
    second = {x.step: x.value for x in c.get_metric_history(result["run_id"], "loss")}
    at = result["resumed_from_step"]
    # every step ran: up to the fault on 2 workers, from the checkpoint to the end on 1
    assert sorted(first) == list(range(1, at + STEPS_AFTER_CHECKPOINT + 1))
    assert sorted(second) == list(range(at + 1, m["training_config"]["total_steps"] + 1))
    # resuming on 1 worker trains what continuing on 2 did: the same loss for the steps both ran
    again = [at + k for k in range(1, STEPS_AFTER_CHECKPOINT + 1)]
    assert [second[s] for s in again] == pytest.approx([first[s] for s in again], rel=1e-4), (first, second)
    # MLflow says which attempt failed and why, and which one continued it
    failed = c.get_run(first_run)
    assert failed.info.status == "FAILED" and failed.data.tags["memo.error"], failed.data.tags
    tags = c.get_run(result["run_id"]).data.tags
    assert tags["memo.continues_run"] == first_run and tags["memo.resumed_from_step"] == str(at)
    # the interrupted run's checkpoint was sharded: each of the 2 ranks wrote its own part
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(first_shards), first_shards

    history = [x.value for run in (first_run, result["run_id"])
               for x in sorted(c.get_metric_history(run, "selection_recall"), key=lambda x: x.step)]
    assert history == list(SCORES)
    replay = EpochSelection(2, min_epochs=3)  # the recipe's 6 epochs, capped by max_epochs
    for score in history:
        replay.add(score)
        if replay.stop:
            break
    assert len(history) == result["epochs_trained"] == len(replay.history)
    assert result["best_epoch"] == replay.best_epoch and result["selection_recall"] == replay.best
    assert result["best_epoch"] == 1 and result["epochs_trained"] == 3

    # Nothing was gathered whole before the export; the last checkpoint holds the current weights and the
    # best epoch's beside them.
    ckpts = sorted(memo_home().glob(f"ray_results/{result['ray_run']}/checkpoint_*"))
    with_best = [c for c in ckpts if (c / "best").exists()]
    assert with_best, [sorted(p.name for p in c.iterdir()) for c in ckpts]
    exported, _ = load_model(result["model_dir"])
    saved = set(dcp.FileSystemReader(str(with_best[-1] / "best")).read_metadata().state_dict_metadata)

    def read(folder):  # the "model" part of a DCP folder, as full tensors in this one process
        state = {"model": {k: v.clone() for k, v in exported.state_dict().items() if f"model.{k}" in saved}}
        dcp.load(state, checkpoint_id=str(folder))
        return state["model"]

    best, current = read(with_best[-1] / "best"), read(with_best[-1] / "shards")
    assert best, saved
    for name, w in best.items():
        assert torch.allclose(w, exported.state_dict()[name], atol=1e-6), name  # the export is the best epoch
    assert any(not torch.allclose(w, current[name]) for name, w in best.items())  # not the last one
    assert result["peak_rss_mb"] > 0

def real_executive() -> str | None:
    from memo.engines.llamacpp import available
    from memo.errors import MemoError
    from memo.gguf import resolve_gguf

    try:
        resolve_gguf("qwen2.5-coder-0.5b")
        return "qwen2.5-coder-0.5b" if available() else None
    except MemoError:
        return None


@pytest.fixture(scope="module")
def served(trained, tiny_model):
    from memo import registry, serving
    from memo.config import ServeConfig
    from ray import serve

    registry.set_alias("e2e", "champion", trained[0]["version"])
    try:  # torn down also when the app fails to start, so the next module gets every CPU
        yield serving.run(ServeConfig(domains=["e2e"], port=free_port(), max_new_tokens=16, max_tokens_cap=32,
                                      alias_refresh_s=0.5, executive_local=real_executive() or tiny_model))
    finally:
        serve.shutdown()


def test_openai_client_gets_an_answer_with_the_version(served, trained):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="e2e", messages=[{"role": "user", "content": "Who founded the Halvenmere Cooperative?"}], max_tokens=8)
    version = trained[0]["version"]
    assert raw.headers["x-memo-model-version"] == version
    body = raw.parse()
    assert body.choices[0].message.role == "assistant"
    assert body.model_extra["memo_version"] == version
    assert 0 < body.usage.completion_tokens <= 8
    models = client.models.list()
    assert [(m.id, m.model_extra["memo_version"]) for m in models.data] == [("e2e", version), ("memo/e2e", version)]


def test_router_errors_are_openai_shaped(served):
    r = httpx.post(served + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(served + "/v1/chat/completions", json={"model": "e2e", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(served + "/v1/chat/completions",
                   json={"model": "e2e", "messages": [{"role": "user", "content": "q"}], "max_tokens": 999})
    assert r.status_code == 400 and "cap" in r.json()["error"]["message"]
    r = httpx.post(served + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert httpx.get(served + "/healthz").json() == {"status": "ok"}


def test_promotion_switches_the_served_version(served, trained, tiny_model):
    import time

    from memo import registry

    run = registry.start_run("e2e", "train", {})
    v_new = registry.register_memory("e2e", trained[0]["model_dir"], run, {"parent_version": trained[0]["version"]},
                                     None)
    registry.set_alias("e2e", "champion", v_new)
    time.sleep(1.0)  # alias_refresh_s=0.5
    r = httpx.post(served + "/v1/chat/completions",
                   json={"model": "e2e", "messages": [{"role": "user", "content": "q?"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.headers["x-memo-model-version"] == v_new
    serving = registry.domain_status("e2e")["serving"]
    assert [s["version"] for k, s in serving.items() if k.startswith("MemoryModel/")] == [v_new]


def test_single_turn_executive_questions_the_served_memory(served, tiny_model):
    from memo.executive import single_turn
    from memo.executive.clients import HttpMemory, LocalLLM

    tr = single_turn("Who founded the Halvenmere Cooperative?", LocalLLM(tiny_model), HttpMemory(served, "e2e", max_tokens=16))
    mem = [s for s in tr.steps if s["role"] == "memory"]
    assert mem[0]["question"] == "Who founded the Halvenmere Cooperative?"
    assert tr.memory_calls == len(mem) >= 1
    assert tr.memory_version is not None
    assert tr.answer



@pytest.mark.skipif(real_executive() is None, reason="llama-server or qwen2.5-coder-0.5b is not installed")
def test_served_memo_answer_with_a_real_executive(served):
    """The product: the openai client asks memo/e2e, the served executive (a real instruct model on
    llama.cpp) questions the memory in-cluster; plain and streamed, with version and memory calls."""
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused")
    ask = {"model": "memo/e2e", "messages": [{"role": "user", "content": "Who founded the Halvenmere Cooperative?"}]}
    reply = client.chat.completions.create(**ask, extra_body={"memo_trace": True})
    assert reply.choices[0].message.content and reply.model_extra["memory_calls"] >= 1
    assert reply.model_extra["memo_version"] and reply.usage.prompt_tokens > 20
    decompose = next(s for s in reply.model_extra["memo_trace"]["steps"] if s.get("step") == "decompose")
    assert "?" in decompose["output"]  # a real executive writes sub-questions
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
