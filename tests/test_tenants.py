"""Tenants file, key hashing, rate limiting and the serve configs (no Ray needed)."""


import pytest
import yaml
from conftest import REPO, run_cli
from memo.errors import MemoError
from memo.tenants import (
    RateLimiter,
    Tenant,
    add_tenant,
    authenticate,
    hash_key,
    load_tenants,
)


def test_add_stores_only_the_hash_and_authenticates(tmp_path):
    f = tmp_path / "tenants.yaml"
    k1 = add_tenant(f, "a", ["demo"], 60)
    k2 = add_tenant(f, "b", ["*"])
    text = f.read_text()
    assert k1 not in text and k2 not in text and hash_key(k1) in text
    assert oct(f.stat().st_mode)[-3:] == "600"
    tenants = load_tenants(f)
    assert authenticate(tenants, k1).name == "a" and authenticate(tenants, k2).name == "b"
    assert authenticate(tenants, k1 + "x") is None and authenticate(tenants, "") is None
    assert tenants[0].allows("demo") and not tenants[0].allows("hr") and tenants[1].allows("hr")
    with pytest.raises(MemoError, match="already"):
        add_tenant(f, "a", ["demo"])


@pytest.mark.parametrize("content, message", [
    ("tenants: {}", "top-level `tenants:` list"),
    ("tenants:\n  - {name: a, key: memo-sk-x, domains: [d]}", "plain `key`"),
    ("tenants:\n  - {name: a, key_sha256: abc, domains: [d]}", "64 lowercase hex"),
    (f"tenants:\n  - {{name: a, key_sha256: {'a' * 64}, domains: []}}", "non-empty list"),
    (f"tenants:\n  - {{name: a, key_sha256: {'a' * 64}, domains: [Bad!]}}", "domain"),
    (f"tenants:\n  - {{name: a, key_sha256: {'a' * 64}, domains: [d], requests_per_minute_per_replica: -1}}",
     "integer >= 0"),
    (f"tenants:\n  - {{name: a, key_sha256: {'a' * 64}, domains: [d], requests_per_minute: 5}}",
     "now `requests_per_minute_per_replica`"),
])
def test_bad_tenants_files_name_the_file_and_entry(tmp_path, content, message):
    f = tmp_path / "t.yaml"
    f.write_text(content)
    with pytest.raises(MemoError, match=message) as e:
        load_tenants(f)
    assert str(f) in str(e.value)


def test_rate_limiter_allows_a_burst_then_refills():
    t = Tenant("a", "0" * 64, ["*"], requests_per_minute_per_replica=60)  # burst 10, then 1 per second
    rl = RateLimiter()
    assert all(rl.allow(t, now=100.0)[0] for _ in range(10))
    ok, wait = rl.allow(t, now=100.0)
    assert not ok and 0 < wait <= 1.0
    assert rl.allow(t, now=101.01)[0]
    assert rl.allow(Tenant("u", "1" * 64, ["*"]), now=0)[0]  # 0 = unlimited


def test_cli_prints_the_key_once_and_never_writes_it(tmp_path):
    f = tmp_path / "tenants.yaml"
    res = run_cli("tenants", "add", "--file", str(f), "--name", "team", "--domains", "demo,hr", "--rpm-per-replica", "30")
    assert res.returncode == 0, res.stderr
    key = res.stdout.split("API key (shown once; store it in your secret manager): ")[1].strip()
    assert key.startswith("memo-sk-") and key not in f.read_text()
    assert load_tenants(f)[0].domains == ["demo", "hr"] and load_tenants(f)[0].requests_per_minute_per_replica == 30
    res = run_cli("tenants", "revoke", "--file", str(f), "--name", "nobody")
    assert res.returncode == 2 and "no such tenant" in res.stderr
    assert run_cli("tenants", "revoke", "--file", str(f), "--name", "team").returncode == 0
    assert load_tenants(f) == []


def test_tenants_file_reloads_and_keeps_the_last_good_one(tmp_path):
    """What a router replica sees: a new key works and a revoked one stops after a reload; a malformed
    file is rejected with one log line and the previous tenants stay in force."""
    import logging
    import os
    import time

    from memo.tenants import TenantsFile, revoke_tenant

    lines = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("memo.tenants").addHandler(handler)

    f = tmp_path / "tenants.yaml"
    k1 = add_tenant(f, "a", ["demo"])
    live = TenantsFile(f, reload_s=0.05)
    k2 = add_tenant(f, "b", ["demo"])
    assert authenticate(live.current(), k2) is None  # not re-read before reload_s has passed
    time.sleep(0.06)
    assert authenticate(live.current(), k2).name == "b"
    revoke_tenant(f, "a")
    time.sleep(0.06)
    assert authenticate(live.current(), k1) is None and authenticate(live.current(), k2).name == "b"
    good = f.read_text()
    f.write_text(good.replace("key_sha256", "key"))  # a plain key: refused
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    time.sleep(0.06)
    assert authenticate(live.current(), k2).name == "b"
    time.sleep(0.06)
    live.current()  # the same bad file: not logged again
    logging.getLogger("memo.tenants").removeHandler(handler)
    assert len(lines) == 1 and "keeping the previous 1 tenant(s)" in lines[0] and str(f) in lines[0], lines
    assert k2 not in lines[0]


@pytest.mark.parametrize("path", ["serve_configs/demo.yaml", "serve_configs/single_domain.yaml",
                                  "serve_configs/multi_domain.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_configs_are_valid_serve_configs(path):
    from memo.config import ServeConfig, build_config

    doc = yaml.safe_load((REPO / path).read_text())
    if "spec" in doc:  # the RayService embeds the same config
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = doc["applications"][0]
    assert app["import_path"] == "memo.serving:build_app"
    cfg = build_config(ServeConfig, {**app["args"], "host": doc["http_options"]["host"]})
    assert cfg.host == "127.0.0.1" or cfg.tenants_file  # exposed routers always need keys


def test_non_loopback_router_without_keys_is_refused():
    from memo.config import ServeConfig, build_config

    with pytest.raises(MemoError, match="needs API keys"):
        build_config(ServeConfig, {"host": "0.0.0.0"})
    assert build_config(ServeConfig, {"host": "0.0.0.0", "allow_anonymous": True}).allow_anonymous
    with pytest.raises(MemoError, match="dedicated_domains"):
        build_config(ServeConfig, {"domains": ["a"], "dedicated_domains": ["b"]})


def test_vllm_engine_is_optional_and_says_how_to_get_it():
    from memo.engines.vllm import VLLMMemory

    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(MemoError, match="memo-platform\\[gpu\\]"):
            VLLMMemory("/nonexistent")
        return
    pytest.skip("vLLM is installed: the GPU path is exercised on GPU machines only")
