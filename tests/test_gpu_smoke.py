"""The one-GPU smoke script (benchmarks/gpu_smoke.py) runs its checks on CPU too (gloo, a tiny decoder): a
session lent a GPU machine runs it there in one call, and this keeps it working in between."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_smoke_script_passes_its_checks_on_cpu():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--device", "cpu",
                          "--sizes", "tiny", "--steps", "1", "--batch", "2"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["ok"] and len(result["checks"]) == 4 and all(result["checks"].values())
    assert result["runs"][0]["tokens_per_s"] > 0
