"""Failure and resume: a Ray Train worker process dies mid-run and training picks up from the last
checkpoint. In its own module so that no Serve replica holds the CPUs the 2 workers need."""

import pytest

from conftest import DEMO_CORPUS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reflections(ray_local, tmp_path_factory):
    from memo.config import SynthesizeConfig, build_config
    from memo.reflections import synthesize

    out = tmp_path_factory.mktemp("refl")
    synthesize(build_config(SynthesizeConfig, {"domain": "kill", "corpus": str(DEMO_CORPUS), "out": str(out)}))
    return out


def test_a_worker_killed_mid_run_resumes_from_the_last_checkpoint(ray_local, tiny_model, reflections, monkeypatch):
    """Rank 0's process exits at step 5; Ray Train restarts both workers from the step-4 checkpoint
    (model, optimizer, scheduler, data position) and the run ends with the planned number of steps."""
    from memo import registry
    from memo.config import TrainConfig, build_config
    from memo.memory import read_manifest, train

    monkeypatch.setenv("MEMO_TEST_FAIL_AT_STEP", "5")
    cfg = build_config(TrainConfig, {"domain": "e2ekill", "reflections": str(reflections), "base_model": tiny_model,
                                     "workers": 2, "epochs": 1, "lr": 1e-3, "checkpoint_every": 4,
                                     "eval_sample": 0})
    result = train(cfg, progress=print)
    total = read_manifest(result["model_dir"])["training_config"]["total_steps"]
    assert result["step"] == total
    steps = [m.step for m in registry.client().get_metric_history(result["run_id"], "loss")]
    # steps 1..5 ran, the process died, steps 5..total ran again from the checkpoint at step 4
    assert sorted(steps) == sorted(list(range(1, 6)) + list(range(5, total + 1)))
    assert registry.resolve_version("e2ekill", "candidate") == result["version"]
