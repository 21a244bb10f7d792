"""Failure and resume: a Ray Train worker process dies mid-run and training picks up from the last
checkpoint, and a run that chooses its epoch on held-out rewordings (`select_on=heldout_recall`) keeps the
best epoch's weights through that. In its own module so that no Serve replica holds the CPUs the 2
workers need.

The fault comes from the test side: the worker loop is wrapped (cloudpickle ships the closure to the
workers) so that rank 0's process exits once, a few steps into the second epoch. The production loop
has no hook for it.
"""

import pytest

from conftest import DEMO_CORPUS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reflections(ray_local, tmp_path_factory):
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize

    out = tmp_path_factory.mktemp("refl")
    synthesize(build_config(SynthesizeConfig, {"domain": "kill", "corpus": str(DEMO_CORPUS), "out": str(out)}))
    return out


SCORES = (0.5, 0.25, 0.25)  # the held-out score of epochs 1-3


def dies_once_in_epoch_two(steps_in: int, marker: str):
    """The real worker loop, but rank 0's process exits when it starts its `steps_in`-th optimizer step
    after the first epoch's held-out score, the first time only (the marker file remembers), as a node
    losing a worker would. The held-out scores are SCORES."""
    from memo.training import loop

    real_loop = loop.train_loop_per_worker

    def loop_that_dies(cfg):
        import os
        import time

        import ray.train

        from memo.training import loop as worker_loop

        real_step, real_score, calls = worker_loop.accumulation_step, worker_loop.selection_recall, [0]
        # epochs scored so far: none in the first process, epoch 1 in the one restarted in epoch 2
        scored = [1 if os.path.exists(marker) else 0]

        def score(*args, **kw):
            # the real scoring runs on both ranks (an FSDP forward needs both); its value on a random tiny
            # model says nothing, so the epochs' scores are given: epoch 1 best, then worse
            real_score(*args, **kw)
            scored[0] += 1
            return SCORES[scored[0] - 1]

        def step_or_die(*args, **kw):
            calls[0] += scored[0] > 0
            if calls[0] == steps_in and not os.path.exists(marker) and ray.train.get_context().get_world_rank() == 0:
                open(marker, "w").close()
                # The controller collects reported checkpoints on its health check (every 2 s): dying
                # within that window would lose the last one, so wait past it first.
                time.sleep(5)
                os._exit(1)
            return real_step(*args, **kw)

        worker_loop.accumulation_step, worker_loop.selection_recall = step_or_die, score
        return real_loop(cfg)

    return loop_that_dies


def test_a_worker_killed_mid_run_resumes_from_the_last_checkpoint_with_the_best_epoch(
        ray_local, tiny_model, reflections, monkeypatch, tmp_path):
    """2 FSDP workers, select_on=heldout_recall: a selection set of rewordings (apart from the gate's held-out
    set) is asked after every epoch. Rank 0's process exits 3 steps into epoch 2; Ray Train restarts both
    workers from the last checkpoint (model, optimizer, scheduler, data position, the scores so far and the
    best epoch's weights). Training stops `patience` epochs after the best one, and the best epoch's
    weights are what is exported."""
    import torch
    import torch.distributed.checkpoint as dcp
    from memo import registry
    from memo.config import TrainConfig, build_config, memo_home
    from memo.models import load_model, read_manifest
    from memo.training import stage, train
    from memo.training.selection import EpochSelection

    monkeypatch.setattr(stage, "train_loop_per_worker", dies_once_in_epoch_two(3, str(tmp_path / "died")))
    cfg = build_config(TrainConfig, {"domain": "e2ekill", "reflections": str(reflections), "base_model": tiny_model,
                                     "workers": 2, "lr": 1e-3, "checkpoint_every": 4, "eval_sample": 0,
                                     "select_on": "heldout_recall", "max_epochs": 3, "patience": 2,
                                     "select_ratio": 0.05})
    result = train(cfg)
    assert (tmp_path / "died").exists()  # the fault happened
    m = read_manifest(result["model_dir"])
    assert m["selection_rows"] > 0 and m["heldout_rows"] > 0
    steps = [x.step for x in registry.client().get_metric_history(result["run_id"], "loss")]
    # every step ran once: the steps 1-12 before the fault (checkpoint at 12), the rest after the restart
    assert sorted(steps) == list(range(1, result["step"] + 1)) == list(range(1, m["training_config"]["total_steps"] + 1))
    assert registry.resolve_version("e2ekill", "candidate") == result["version"]

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
    ckpts = sorted(memo_home().glob(f"ray_results/memo-e2ekill-{result['run_id'][:8]}/checkpoint_*"))
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
