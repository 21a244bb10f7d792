"""Parts that fail, as a user meets them: an engine that dies while loading is one line from the CLI and
from `memo serve` (never a crash loop), training that cannot get its workers fails fast naming the
resources, and a test suite whose fixture raises or whose test stalls inside Ray Train's fit() leaves
nothing behind for the next module. The AMX probe of the llama.cpp install is checked on this CPU."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_cli

from memo.engines.llamacpp import available

needs_llamacpp = pytest.mark.skipif(not available(), reason="llama-server is not installed (make install)")
# Errors within a documented time (a minute, four): make test runs these on an otherwise idle machine.
pytestmark = pytest.mark.timed


def cpu_flags() -> set[str]:
    line = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


def one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert lines and lines[-1].startswith("memo "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("probe") / "amx_probe"
    subprocess.run(["cc", "-O1", "-o", str(exe), str(REPO / "cluster" / "amx_probe.c")], check=True)
    return exe


def run_probe(exe: Path, from_check: int = 1):
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MEMO_AMX_PROBE_FROM_CHECK": str(from_check)})


def test_the_amx_probe_gives_one_verdict_that_matches_its_exit_status(probe):
    res = run_probe(probe)
    assert re.fullmatch(r"amx: (usable|unusable: .+)\n", res.stdout), res.stdout
    assert (res.returncode == 0) == (res.stdout == "amx: usable\n")
    if not {"amx_tile", "amx_int8"} <= cpu_flags():
        assert "does not advertise" in res.stdout  # this CPU has no AMX: the first check says so


def test_the_amx_probe_survives_tile_instructions_that_fault(probe):
    """What the Intel VM does (advertises AMX, faults on LDTILECFG), shown on any CPU whose tiles do not
    work: from check 4 the child runs the instructions, dies on them, and the probe reports it."""
    res = run_probe(probe, from_check=4)
    if res.returncode == 0:
        assert res.stdout == "amx: usable\n"  # a CPU whose tiles work: the dot products came out right
    else:
        assert re.fullmatch(r"amx: unusable: the tile instructions raised .+\n", res.stdout), res.stdout


@needs_llamacpp
def test_the_installed_server_uses_amx_only_where_the_probe_allows_it_and_passed_its_smoke_test(probe):
    import json

    from memo.engines.llamacpp import server_binary, smoke_test

    record = json.loads((Path(server_binary()).parent.parent / "share" / "memo" / "llama.cpp" / "build.json")
                        .read_text())
    assert record["smoke_test"].startswith("smoke test: ok")
    if run_probe(probe).returncode != 0:
        assert not any(f.startswith("AMX") for f in record["cpu_features"]), record
    # and it still runs here, now
    assert smoke_test(server_binary()).startswith("ok")


@pytest.fixture
def crashing_server(tmp_path) -> dict:
    """A llama-server that dies the way the AMX build did on the Intel VM: a line of log, then SIGSEGV."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'ggml_backend_amx_mul_mat: tile config'\nkill -SEGV $$\n")
    fake.chmod(0o755)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return {"env": {"MEMO_LLAMA_SERVER": str(fake)}, "gguf": str(gguf)}


def test_an_engine_that_crashes_on_load_is_one_line_with_its_exit_and_log(crashing_server):
    res = run_cli("ask", "--domain", "nothing", "--executive-local", crashing_server["gguf"], "Who?",
                  env=crashing_server["env"])
    line = one_error_line(res)
    assert "llama-server exited with signal SIGSEGV loading model.gguf" in line
    assert "ggml_backend_amx_mul_mat" in line  # the last lines of its log


@needs_llamacpp
def test_a_gguf_the_real_server_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    line = one_error_line(run_cli("ask", "--domain", "nothing", "--executive-local", str(bad), "Who?"))
    assert re.search(r"llama-server exited with code \d+ loading broken\.gguf: .+", line), line


def test_a_missing_default_executive_names_the_install_command(tmp_path):
    line = one_error_line(run_cli("ask", "--domain", "nothing", "Who?", env={"MEMO_MODELS": str(tmp_path)}))
    assert "executive_local=auto needs qwen2.5-coder-1.5b" in line and "memo models install" in line


@pytest.mark.slow
def test_memo_serve_stops_with_the_engine_error_instead_of_retrying(crashing_server, tmp_path):
    """The executive deployment's replica fails its constructor (its llama-server dies on load): Serve
    gives up after 3 tries and `memo serve` exits 2 with the engine's own line, in bounded time."""
    t0 = time.monotonic()
    res = run_cli("serve", "--port", str(free_port()), "--executive-local", crashing_server["gguf"],
                  env={**crashing_server["env"], "MEMO_HOME": str(tmp_path / "home")})
    # Ray forwards the Serve controller's log of each failed try to the terminal; the command's own
    # verdict is its last line, and its exit code 2.
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("memo serve: error: Serve app 'memo' failed to start") and "ExecutiveModel" in line, line
    assert "llama-server exited with signal SIGSEGV" in line, line
    assert time.monotonic() - t0 < 240


@pytest.mark.slow
def test_training_more_workers_than_the_cluster_has_fails_at_once_naming_both(tmp_path, tiny_model):
    import pandas as pd

    from memo.synthesis.schema import COLUMNS

    rows = [{"id": f"f{i}", "domain": "wide", "step": "direct", "question": f"Who keeps light {i}?",
             "answer": f"Keeper {i} keeps light {i}.", "source_chunk_ids": ["x#0"], "generator": "rules",
             "verified": True} for i in range(16)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp_path / "reflections.parquet")
    home = tmp_path / "home"
    t0 = time.monotonic()
    res = run_cli("train", "--domain", "wide", "--reflections", str(tmp_path), "--base-model", tiny_model,
                  "--workers", "8", env={"MEMO_HOME": str(home)})
    line = one_error_line(res)
    cpus = os.cpu_count()
    assert f"train.workers=8 needs 8 CPU (1 per worker) but the Ray cluster has {cpus:g} CPU in all" in line
    assert time.monotonic() - t0 < 60
    assert not (home / "memories").exists()  # nothing trained, nothing registered


# A small pytest session of its own (a subprocess, its own Ray cluster), with three modules: one whose
# fixture starts a Serve app and then raises, one that starts a Serve app and stalls inside Ray Train's
# fit() until pytest-timeout stops it, and one that checks the cluster is whole again.
INNER = {
    "conftest.py": """
        import importlib.util
        import sys

        # The project's fixtures and its per-module clean-up net, loaded under another name (this file is
        # itself the module `conftest` here).
        sys.path.insert(0, {tests!r})
        spec = importlib.util.spec_from_file_location("memo_tests_conftest", {tests!r} + "/conftest.py")
        project = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(project)
        globals().update({{k: v for k, v in vars(project).items() if not k.startswith("__")}})
    """,
    "test_a_fixture_raises.py": """
        import pytest

        @pytest.fixture(scope="module")
        def served(ray_local, tiny_model):
            from memo import serving
            from memo.config import ServeConfig
            from ray import serve

            try:
                serving.run(ServeConfig(port={port_a}, serve_executive=False, replica_cpus=0.5))
                raise RuntimeError("the fixture fails after Serve started")
                yield
            finally:
                serve.shutdown()

        def test_needs_the_app(served):
            pass
    """,
    "test_b_stalls_in_fit.py": """
        import time

        import pandas as pd
        import pytest

        @pytest.fixture(scope="module")
        def served(ray_local):
            from memo import serving
            from memo.config import ServeConfig
            from ray import serve

            try:
                yield serving.run(ServeConfig(port={port_b}, serve_executive=False, replica_cpus=0.25))
            finally:
                serve.shutdown()

        def stalls(cfg):
            time.sleep(3600)  # a worker stuck in a collective, a hung filesystem...

        @pytest.mark.timeout(20, func_only=True)  # the stall itself; setup starts Ray and Serve
        def test_stalls_inside_fit(served, tiny_model, tmp_path, monkeypatch):
            from memo.config import TrainConfig, build_config
            from memo.synthesis.schema import COLUMNS
            from memo.training import stage

            rows = [dict(id=f"f{{i}}", domain="stall", step="direct", question=f"Q{{i}}?", answer=f"A{{i}}.",
                         source_chunk_ids=["x#0"], generator="rules", verified=True) for i in range(8)]
            pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp_path / "reflections.parquet")
            monkeypatch.setattr(stage, "train_loop_per_worker", stalls)
            stage.train(build_config(TrainConfig, dict(domain="stall", reflections=str(tmp_path),
                                                        base_model=tiny_model, eval_sample=0)))
    """,
    "test_c_cluster_is_whole.py": """
        import time

        def test_every_cpu_is_free_and_nothing_is_left(ray_local):
            import ray
            from ray.util.state import list_actors

            deadline = time.monotonic() + 30
            while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
                assert time.monotonic() < deadline, ray.available_resources()
                time.sleep(0.5)
            alive = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")],
                                                       address=ray.get_runtime_context().gcs_address)]
            assert not [c for c in alive if c.startswith(("ServeReplica", "TrainController", "RayTrainWorker"))], alive
    """,
}


@pytest.mark.slow
def test_a_failed_fixture_and_a_stalled_fit_leave_nothing_for_the_next_module(tmp_path):
    ports = [free_port(), free_port()]
    for name, body in INNER.items():
        text = textwrap.dedent(body).format(tests=str(REPO / "tests"), port_a=ports[0], port_b=ports[1])
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("MEMO_HOME", "RAY_ADDRESS", "PYTEST_ADDOPTS")}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-c", str(REPO / "pyproject.toml"), str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    out = res.stdout + res.stderr
    assert re.search(r"1 failed, 1 passed.*1 error", out), out[-4000:]
    assert "Timeout" in out and "test_stalls_inside_fit" in out, out[-4000:]  # pytest-timeout stopped it
    assert "ERROR at setup of test_needs_the_app" in out and "the fixture fails after Serve started" in out
    assert "on the Ray cluster; released" not in out, out[-4000:]  # fixtures and train() cleaned up, not the net
    assert time.monotonic() - t0 < 300
