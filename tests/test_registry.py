import json

import pytest
from memo import registry
from memo.errors import MemoError


@pytest.fixture(scope="module")
def two_versions(tiny_model):
    run1 = registry.start_run("regtest", "train", {"lr": 1e-3})
    v1 = registry.register_memory("regtest", tiny_model, run1, {"base_model": "tiny", "reflection_rows": 3},
                                  "candidate")
    run2 = registry.start_run("regtest", "train", {"lr": 2e-3})
    v2 = registry.register_memory("regtest", tiny_model, run2, {"base_model": "tiny", "reflection_rows": 4},
                                  "candidate")
    return v1, v2


def test_state_lives_under_memo_home(memo_home, two_versions):
    assert registry.tracking_uri() == f"sqlite:///{memo_home / 'mlflow.db'}"
    assert (memo_home / "mlflow.db").exists()
    assert any((memo_home / "mlartifacts").rglob("config.json"))


def test_versions_aliases_and_lineage(two_versions):
    v1, v2 = two_versions
    assert (v1, v2) == ("1", "2")
    assert registry.resolve_version("regtest", "candidate") == "2"
    st = registry.domain_status("regtest")
    assert [v["rows"] for v in st["versions"]] == ["3", "4"]
    assert st["aliases"] == {"candidate": "2"}


def test_alias_moves_are_audited(two_versions):
    assert registry.set_alias("regtest", "champion", "1", reason="first") is None
    assert registry.set_alias("regtest", "champion", "2", reason="better") == "1"
    hist = registry.domain_status("regtest")["alias_history"]
    moves = [(h["alias"], h["from"], h["to"], h["reason"]) for h in hist if h["alias"] == "champion"]
    assert moves == [("champion", None, "1", "first"), ("champion", "1", "2", "better")]


def test_unknown_domain_and_alias_are_clear_errors(two_versions):
    with pytest.raises(MemoError, match="unknown domain"):
        registry.resolve_version("nosuchdomain", "champion")
    with pytest.raises(MemoError, match=r"no alias 'gold' \(aliases: .*candidate->v2"):
        registry.resolve_version("regtest", "gold")


def test_download_version_returns_a_loadable_model_folder(two_versions):
    path = registry.download_version("regtest", "1")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert registry.download_version("regtest", "1") == path  # cached, not copied again


def test_parse_model_uri():
    assert registry.parse_model_uri("models:/memo-demo@champion") == ("demo", "champion", None)
    assert registry.parse_model_uri("models:/memo-demo/3") == ("demo", None, "3")
    with pytest.raises(MemoError):
        registry.parse_model_uri("models:/other@x")


def test_serving_audit_spans(two_versions):
    """A replica's spans: open v1, then v2 (v1 closes), as `memo status` reads them back."""
    a = registry.open_serving_span("regtest", "MemoryModel", "r1", "1")
    b = registry.open_serving_span("regtest", "MemoryModel", "r1", "2")
    registry.close_serving_span(a)
    st = registry.domain_status("regtest")
    mine = [s for s in st["serving_history"] if s["replica"] == "r1"]
    assert [(s["version"], s["until"] is None) for s in mine] == [("1", False), ("2", True)]
    assert st["serving"]["MemoryModel/r1"] == {"version": "2", "since": b["since"]}
    json.dumps(st)


def _write_spans(writer: int, n: int) -> list[str]:
    """One replica's life: n versions served in turn, each span opened, the previous one closed."""
    from memo import registry as reg

    ids, previous = [], None
    for k in range(n):
        span = reg.open_serving_span("audit", "MemoryModel", f"replica-{writer}", str(k % 3 + 1))
        if previous:
            reg.close_serving_span(previous)
        ids.append(span["id"])
        previous = span
    return ids


def test_concurrent_replicas_lose_no_span(tiny_model):
    """4 replica processes x 40 spans, writing at once to the same registered model: every span is
    there, each closed exactly when its replica moved on (the old read-modify-write tag lost spans)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    registry.register_memory("audit", tiny_model, registry.start_run("audit", "train", {}), {}, "champion")
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        written = [i for ids in pool.map(_write_spans, range(4), [40] * 4) for i in ids]
    spans = registry.serving_spans("audit")
    assert len(written) == 160 and sorted(s["id"] for s in spans) == sorted(written)
    for w in range(4):
        mine = [s for s in spans if s["replica"] == f"replica-{w}"]
        assert len(mine) == 40 and [s["until"] is None for s in mine] == [False] * 39 + [True]
    assert len(registry.domain_status("audit")["serving"]) == 4



def test_a_run_its_process_failed_in_is_marked_failed_with_the_error_not_left_running(memo_home, tmp_path):
    """A stage that fails after it started its MLflow run: the CLI's error handler marks the run FAILED with
    the error (fail_open_runs), and a process that dies of an error nothing handled marks it at exit;
    ended runs are left alone."""
    import os
    import subprocess
    import sys

    done = registry.start_run("failtest", "train", {})
    registry.end_run(done)
    failed = registry.start_run("failtest", "train", {})
    registry.fail_open_runs("the disk is full\nsecond line")
    c = registry.client()
    assert c.get_run(done).info.status == "FINISHED"
    run = c.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["memo.error"] == "the disk is full"

    code = ("from memo import registry\nprint(registry.start_run('failtest', 'train', {}), flush=True)\n"
            "raise RuntimeError('unhandled')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MEMO_HOME": str(memo_home)})
    assert res.returncode == 1 and "unhandled" in res.stderr
    run = c.get_run(res.stdout.split()[-1])
    assert run.info.status == "FAILED" and "ended before the run finished" in run.data.tags["memo.error"]
