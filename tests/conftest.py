import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "examples" / "demo" / "corpus.jsonl"


@pytest.fixture(scope="session", autouse=True)
def memo_home(tmp_path_factory):
    """Every test session gets its own project home: nothing touches the user's .memo."""
    home = tmp_path_factory.mktemp("memo_home")
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
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with a BPE tokenizer trained on the demo corpus (seconds to build)."""
    from tiny import build_tiny_model

    texts = [json.loads(line)["text"] for line in DEMO_CORPUS.read_text().splitlines()]
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts * 3, vocab_size=600))


def run_cli(*args, env=None, cwd=REPO):
    """Run the real `memo` entry point in a subprocess, as a user would."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "memo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=e, timeout=600)
