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
    epoch on held-out rewordings (select_on=heldout_recall, at most 3 epochs); rank 0's process is killed
    3 steps into epoch 2 (tests/faults.py) and Ray Train restarts both workers from the last checkpoint.
    Trained before Serve holds any CPU."""
    from faults import dies_once_in_epoch_two
    from memo.config import SynthesizeConfig, TrainConfig, build_config
    from memo.synthesis import synthesize
    from memo.training import stage, train

    out = tmp_path_factory.mktemp("refl")
    synthesize(build_config(SynthesizeConfig, {"domain": "e2e", "corpus": str(DEMO_CORPUS), "out": str(out)}))
    cfg = build_config(TrainConfig, {"domain": "e2e", "reflections": str(out), "base_model": tiny_model,
                                     "workers": 2, "lr": 3e-3, "eval_sample": 4, "checkpoint_every": 4,
                                     "select_on": "heldout_recall", "max_epochs": 3, "patience": 2})
    marker = tmp_path_factory.mktemp("fault") / "died"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "train_loop_per_worker", dies_once_in_epoch_two(3, str(marker)))
        result = train(cfg)
    return result, out, marker


def test_training_registers_a_candidate_with_lineage(trained):
    from memo import registry
    from memo.models import read_manifest

    result, refl, _ = trained
    assert result["version"] == registry.resolve_version("e2e", "candidate")
    manifest = read_manifest(result["model_dir"])
    stats = json.loads((refl / "stats.json").read_text())
    assert manifest["corpus_hash"] == stats["corpus_hash"]
    assert manifest["reflections_hash"] == stats["dataset_hash"]
    assert manifest["reflection_rows"] == stats["rows"]
    assert manifest["training_config"]["workers"] == 2
    # 2 workers x length-grouped micro-batches: the planned number of optimizer steps ran
    assert result["step"] == manifest["training_config"]["total_steps"]
    c = registry.client()
    mv = c.get_model_version("memo-e2e", result["version"])
    assert mv.tags["memo.corpus_hash"] == stats["corpus_hash"]
    history = c.get_metric_history(result["run_id"], "loss")
    assert len(history) == result["step"]
    # the reflections are the run's MLflow dataset input, with the synthesize stage's counts beside them
    run = c.get_run(result["run_id"])
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "reflections-e2e" and inp.dataset.digest == stats["dataset_hash"][:36]
    assert run.data.metrics["synth.rows.direct"] == stats["per_step"]["direct"]
    assert run.data.metrics["synth.cross_doc.out"] == stats["steps"]["cross_doc"]["out"]
    assert history[-1].value < history[0].value  # it learned something


def test_a_worker_killed_mid_run_resumed_from_the_last_checkpoint_and_kept_the_best_epoch(trained):
    """2 FSDP workers, select_on=heldout_recall: a selection set of rewordings (apart from the gate's held-out
    set) is asked after every epoch. Rank 0's process exits 3 steps into epoch 2; Ray Train restarts both
    workers from the last checkpoint (model, optimizer, scheduler, data position, the scores so far and the
    best epoch's weights). Training stops `patience` epochs after the best one, and the best epoch's
    weights are what is exported."""
    import torch
    import torch.distributed.checkpoint as dcp
    from faults import SCORES
    from memo import registry
    from memo.config import memo_home
    from memo.models import load_model, read_manifest
    from memo.training.selection import EpochSelection

    result, _, died = trained
    assert died.exists()  # the fault happened
    m = read_manifest(result["model_dir"])
    assert m["selection_rows"] > 0 and m["heldout_rows"] > 0
    steps = [x.step for x in registry.client().get_metric_history(result["run_id"], "loss")]
    # every step ran once: the steps before the fault (the last checkpoint was the step before it), the rest
    # after the restart
    assert sorted(steps) == list(range(1, result["step"] + 1)) == list(range(1, m["training_config"]["total_steps"] + 1))

    history = [x.value for x in sorted(registry.client().get_metric_history(result["run_id"], "selection_recall"),
                                       key=lambda x: x.step)]
    assert history == list(SCORES)
    replay = EpochSelection(2, min_epochs=3)  # the recipe's 6 epochs, capped by max_epochs
    for score in history:
        replay.add(score)
        if replay.stop:
            break
    assert len(history) == result["epochs_trained"] == len(replay.history)
    assert result["best_epoch"] == replay.best_epoch and result["selection_recall"] == replay.best
    assert result["best_epoch"] == 1 and result["epochs_trained"] == 3

    # The checkpoints were sharded: each of the 2 ranks wrote its own part (torch.distributed.checkpoint), rank 0
    # only the schedule, position and scores beside them; nothing was gathered whole before the export. The
    # last one holds the current weights and the best epoch's beside them.
    ckpts = sorted(memo_home().glob(f"ray_results/memo-e2e-{result['run_id'][:8]}/checkpoint_*"))
    shards = [p.name for c in ckpts for p in (c / "shards").glob("*")]
    assert shards.count(".metadata") >= 1 and {"__0_0.distcp", "__1_0.distcp"} <= set(shards), shards
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
