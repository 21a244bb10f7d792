import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "examples" / "demo" / "corpus.jsonl"


@pytest.fixture(scope="session", autouse=True)
def memo_home(tmp_path_factory):
    """Every test session gets its own project home: nothing touches the user's .memo."""
    home = tmp_path_factory.mktemp("memo_home")
    # The built-in models, dequantized once per run (~30 s of CPU each) into a folder the pytest-xdist
    # workers share: memo.models converts under a file lock, so the first worker to need one writes it.
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "converted-models"
    shared.mkdir(exist_ok=True)
    (home / "models").symlink_to(shared, target_is_directory=True)
    os.environ["MEMO_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    from memo.runtime import quiet

    quiet()
    return home


@pytest.fixture(scope="session")
def ray_local(memo_home):
    from memo.runtime import init_ray

    ray = init_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


def release_cluster(timeout_s: float = 60.0) -> str:
    """Stop what a module may have left on the shared Ray cluster (a Serve app, a training run cut off by
    its time limit) and wait until every CPU is free again; returns what was left, '' when nothing."""
    import ray

    if not ray.is_initialized():
        return ""
    from memo.training.placement import holders, stop_training_runs

    left = []
    from ray import serve

    try:
        apps = list(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve never started in this session
        apps = []
    if apps:
        left.append(f"Serve apps {apps}")
        serve.shutdown()
    if stop_training_runs():
        left.append("a training run")
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    if free < total:
        left.append(f"{total - free:g} CPU still held by {holders('CPU') or 'unknown actors'}")
    return "; ".join(left)


@pytest.fixture(scope="module", autouse=True)
def clean_cluster_per_module(request):
    """Each module starts from a cluster with every CPU free, whatever the module before it left (its
    fixtures tear down their own services; this is the net under them, and it says when it had to act)."""
    yield
    left = release_cluster()
    if left:
        import warnings

        warnings.warn(f"{request.module.__name__} left {left} on the Ray cluster; released", stacklevel=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with a BPE tokenizer trained on the demo corpus (seconds to build)."""
    from tiny import build_tiny_model

    texts = [json.loads(line)["text"] for line in DEMO_CORPUS.read_text().splitlines()]
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts * 3, vocab_size=600))


def free_port() -> int:
    """A free TCP port on loopback (for a Serve HTTP proxy a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, env=None, cwd=REPO):
    """Run the real `memo` entry point in a subprocess, as a user would."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "memo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=e, timeout=600)
