"""Failure and resume: a Ray Train worker process dies mid-run and training picks up from the last
checkpoint. In its own module so that no Serve replica holds the CPUs the 2 workers need.

The fault comes from the test side: the worker loop is wrapped (cloudpickle ships the closure to the
workers) so that rank 0's process exits at step 5, once. The production loop has no hook for it.
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


def dies_once_at_step(step: int, marker: str):
    """The real worker loop, but rank 0's process exits when it starts optimizer step `step`, the first
    time only (the marker file remembers), as a node losing a worker would."""
    from memo.training import loop

    real_loop = loop.train_loop_per_worker

    def loop_that_dies(cfg):
        import os
        import time

        import ray.train

        from memo.training import loop as worker_loop

        real_step, calls = worker_loop.accumulation_step, [0]

        def step_or_die(*args, **kw):
            calls[0] += 1
            first_time = not os.path.exists(marker)
            if calls[0] == step and first_time and ray.train.get_context().get_world_rank() == 0:
                open(marker, "w").close()
                # The controller collects reported checkpoints on its health check (every 2 s): dying
                # within that window would lose the last one, so wait past it first.
                time.sleep(5)
                os._exit(1)
            return real_step(*args, **kw)

        worker_loop.accumulation_step = step_or_die
        return real_loop(cfg)

    return loop_that_dies


def test_a_worker_killed_mid_run_resumes_from_the_last_checkpoint(ray_local, tiny_model, reflections, monkeypatch,
                                                                 tmp_path):
    """Rank 0's process exits at step 5; Ray Train restarts both workers from the step-4 checkpoint
    (model, optimizer, scheduler, data position) and the run ends with the planned number of steps."""
    from memo import registry
    from memo.config import TrainConfig, build_config
    from memo.models import read_manifest
    from memo.training import stage, train

    monkeypatch.setattr(stage, "train_loop_per_worker", dies_once_at_step(5, str(tmp_path / "died")))
    cfg = build_config(TrainConfig, {"domain": "e2ekill", "reflections": str(reflections), "base_model": tiny_model,
                                     "workers": 2, "epochs": 1, "lr": 1e-3, "checkpoint_every": 4,
                                     "eval_sample": 0})
    result = train(cfg)
    assert (tmp_path / "died").exists()  # the fault happened
    total = read_manifest(result["model_dir"])["training_config"]["total_steps"]
    assert result["step"] == total
    steps = [m.step for m in registry.client().get_metric_history(result["run_id"], "loss")]
    # steps 1..4 ran, the process died starting step 5, steps 5..total ran again from the checkpoint at 4
    assert sorted(steps) == list(range(1, total + 1))
    assert registry.resolve_version("e2ekill", "candidate") == result["version"]
    # the checkpoints were sharded: each of the 2 ranks wrote its own part (torch.distributed.checkpoint), rank 0
    # only the schedule and position beside them; nothing was gathered whole before the export
    from memo.config import memo_home

    shards = sorted(p.name for p in memo_home().glob(f"ray_results/memo-e2ekill-{result['run_id'][:8]}/checkpoint_*/shards/*"))
    assert shards.count(".metadata") >= 1 and {"__0_0.distcp", "__1_0.distcp"} <= set(shards), shards
    assert result["peak_rss_mb"] > 0
