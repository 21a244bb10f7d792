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


def test_serving_audit(two_versions):
    registry.record_serving("regtest", "MemoryModel", "2")
    serving = registry.domain_status("regtest")["serving"]
    assert serving["MemoryModel"]["version"] == "2"
    json.dumps(serving)
