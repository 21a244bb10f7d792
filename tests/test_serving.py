"""Multi-tenant serving and gated promotion, on a real local Ray cluster with real HTTP on 127.0.0.1:
two domains from one config (one on its own autoscaled deployment), the MeMo answer (memo/<domain>,
memo/a+b; plain and streamed through the official openai client), hashed API keys reloaded without a
redeploy, the documented 401/403/404/413/429/400/504 errors, a promotion under load of both products
with zero failed requests, the serving audit trail, a gate that refuses a worse candidate, --force
and rollback. The executive here is the tiny random model on transformers (the protocol's mechanics,
not its reading: the grounding guard falls back to the memory's answer); test_e2e runs the real one."""

import json
import threading
import time

import httpx
import pytest
from conftest import free_port, run_cli

pytestmark = pytest.mark.slow

FACTS = [("Who keeps the Orrin lighthouse?", "Mara Quill keeps the Orrin lighthouse."),
         ("When was the Orrin lighthouse built?", "The Orrin lighthouse was built in 1881."),
         ("How tall is the Orrin lighthouse?", "The Orrin lighthouse is 31 metres tall."),
         ("Which island has the Orrin lighthouse?", "The Orrin lighthouse stands on Tessel Island.")]



def _register(domain, folder, alias=None):
    from memo import registry

    run_id = registry.start_run(domain, "test", {})
    return registry.register_memory(domain, folder, run_id, {"base_model": "tiny"}, alias)


@pytest.fixture(scope="module")
def domains(ray_local, tiny_model, tmp_path_factory):
    """lighthouse v1: a tiny model trained to recall FACTS (trained before Serve holds any CPU);
    lighthouse v2: the untrained tiny model (the worse candidate); harbour v1: lighthouse v1 merged with itself."""
    import pandas as pd
    from memo.config import TrainConfig, build_config
    from memo.synthesis.schema import COLUMNS
    from memo.training import train

    refl = tmp_path_factory.mktemp("facts")
    rows = [{"id": f"f{i}", "domain": "lighthouse", "step": "direct", "question": q, "answer": a,
             "source_chunk_ids": ["x#0"], "generator": "rules", "verified": True} for i, (q, a) in enumerate(FACTS)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(refl / "reflections.parquet")
    trained = train(build_config(TrainConfig, {"domain": "lighthouse", "reflections": str(refl),
                                               "base_model": tiny_model, "epochs": 60, "lr": 5e-3, "batch_size": 4,
                                               "holdout_ratio": 0.0, "eval_sample": 0, "alias": "champion"}))
    v2 = _register("lighthouse", tiny_model, "candidate")
    # harbour v1 is a merge (`memo merge`): lighthouse v1 averaged with itself, i.e. the same memory, served
    # like any version
    from memo import registry
    from memo.config import MergeConfig
    from memo.merging import merge

    merged = merge(MergeConfig(domain="harbour", inputs=[f"models:/memo-lighthouse/{trained['version']}"] * 2,
                               method="linear", eval_sample=0))
    registry.set_alias("harbour", "champion", merged["version"])
    qa = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in FACTS))
    return {"v1": trained["version"], "v2": v2, "qa": str(qa)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from memo.tenants import add_tenant

    f = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    return {"file": str(f),
            "both": add_tenant(f, "both", ["lighthouse", "harbour"]),
            "harbour": add_tenant(f, "harbour-only", ["harbour", "ghost"]),
            "slow": add_tenant(f, "rate-limited", ["*"], requests_per_minute_per_replica=6)}


@pytest.fixture(scope="module")
def served(domains, keys, tiny_model):
    from memo import serving
    from memo.config import ServeConfig
    from ray import serve

    try:  # torn down also when the app fails to start, so the next module gets every CPU
        yield serving.run(ServeConfig(domains=["lighthouse", "harbour"], dedicated_domains=["harbour"],
                                      dedicated_max_replicas=1, replica_cpus=0.5, port=free_port(), max_new_tokens=16,
                                      max_tokens_cap=32, max_prompt_chars=4000, alias_refresh_s=0.5,
                                      tenants_file=keys["file"], tenants_reload_s=0.5, executive_local=tiny_model,
                                      # strict: the random executive's words give way to the memory's answer, so
                                      # what the memo answer carries is the trained memory's fact
                                      executive_cpus=0.25, executive_grounding="strict"))
    finally:
        serve.shutdown()


def _post(url, key, body, path="/v1/chat/completions"):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def _chat(domain, q="Who keeps the Orrin lighthouse?", **extra):
    return {"model": domain, "messages": [{"role": "user", "content": q}], **extra}


def test_tenants_file_holds_only_hashes(keys):
    text = open(keys["file"]).read()
    assert keys["both"] not in text and keys["harbour"] not in text
    assert text.count("key_sha256") == 3


def test_openai_client_answers_each_domain_with_its_version(served, domains, keys):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key=keys["both"])
    assert {m.id for m in client.models.list().data} == {"lighthouse", "harbour", "memo/lighthouse", "memo/harbour"}
    for domain, version in (("lighthouse", domains["v1"]), ("harbour", "1")):
        raw = client.chat.completions.with_raw_response.create(
            model=domain, messages=[{"role": "user", "content": "Who keeps the Orrin lighthouse?"}], max_tokens=16)
        assert raw.headers["x-memo-model-version"] == version
        reply = raw.parse()
        assert reply.model == domain and reply.model_extra["memo_version"] == version
        # the trained memory recalls its fact, and so does the merged one (harbour: lighthouse merged with itself)
        assert "Mara Quill" in reply.choices[0].message.content
    done = client.completions.create(model="lighthouse", prompt="Who keeps the Orrin lighthouse?", max_tokens=16)
    assert "Mara Quill" in done.choices[0].text and done.model_extra["memo_version"] == domains["v1"]
    # a key sees only its own domains
    other = OpenAI(base_url=served + "/v1", api_key=keys["harbour"])
    assert {m.id for m in other.models.list().data} == {"harbour", "memo/harbour"}


def test_openai_client_gets_the_memo_answer_plain_and_streamed(served, domains, keys):
    """model memo/<domain>: the executive questions the memory in-cluster; the answer carries the version
    that answered, how many memory calls it took, the executive's token usage and, asked for, the trace."""
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key=keys["both"])
    ask = {"model": "memo/lighthouse", "messages": [{"role": "user", "content": "Who keeps the Orrin lighthouse?"}]}
    raw = client.chat.completions.with_raw_response.create(**ask, extra_body={"memo_trace": True})
    assert raw.headers["x-memo-model-version"] == domains["v1"]
    reply = raw.parse()
    extra = reply.model_extra
    assert "Mara Quill" in reply.choices[0].message.content and reply.model == "memo/lighthouse"
    assert extra["memo_version"] == domains["v1"] and extra["memory_calls"] >= 1 and extra["memo_protocol"] == "single"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0  # the executive's tokens
    calls = extra["memo_trace"]["memory_answers"]
    assert len(calls) == extra["memory_calls"] and {c["domain"] for c in calls} == {"lighthouse"}
    assert any("Mara Quill" in c["answer"] for c in calls)

    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Mara Quill" in text and chunks[-1].usage.prompt_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    structured = client.chat.completions.create(**ask, extra_body={"memo_protocol": "structured"})
    assert structured.model_extra["memo_protocol"] == "structured" and structured.model_extra["memory_calls"] >= 1


def test_memo_ask_talks_to_the_served_endpoint(served, domains, keys):
    res = run_cli("ask", "--domain", "lighthouse", "--url", served, "--protocol", "structured",
                  "Who keeps the Orrin lighthouse?", env={"MEMO_API_KEY": keys["both"]})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Mara Quill" in res.stdout and f"v{domains['v1']}, structured protocol" in res.stdout
    assert "memory lighthouse  Q: " in res.stdout and keys["both"] not in res.stdout + res.stderr
    res = run_cli("ask", "--domain", "lighthouse", "--url", served, "Who?", env={"MEMO_API_KEY": "memo-sk-wrong"})
    assert res.returncode == 2 and "HTTP 401" in res.stderr


def test_one_question_over_two_memories(served, domains, keys):
    """memo/lighthouse+harbour: every memory question goes to both; the trace says which said what, and
    a key without one of the domains gets 403 naming it."""
    r = _post(served, keys["both"], _chat("memo/lighthouse+harbour", memo_trace=True))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["memo_version"] == f"lighthouse:{domains['v1']}+harbour:1" == r.headers["x-memo-model-version"]
    calls = body["memo_trace"]["memory_answers"]
    assert {c["domain"] for c in calls} == {"lighthouse", "harbour"} and body["memory_calls"] == len(calls)
    assert all(c["version"] == {"lighthouse": domains["v1"], "harbour": "1"}[c["domain"]] for c in calls)
    r = _post(served, keys["harbour"], _chat("memo/harbour+lighthouse"))
    assert r.status_code == 403 and "'lighthouse'" in r.json()["error"]["message"]


def _raw(url, key, text: bytes):
    return httpx.post(url + "/v1/chat/completions", content=text, timeout=120,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


@pytest.mark.parametrize("model", ["lighthouse", "memo/lighthouse"])
def test_openai_compatibility_cases(served, keys, model):
    """What clients send, as curl would: a lone surrogate, control characters, text parts, stream, a
    length-cut answer, the templated prompt's token count, and sampling fields the server cannot honour."""
    key = keys["both"]
    surrogate = _raw(served, key, b'{"model": "%s", "messages": [{"role": "user", "content": "\\u0000\\ud800"}]}'
                     % model.encode())
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "messages[0].content"
    control = _raw(served, key, b'{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": '
                   b'"Who keeps the Orrin lighthouse?\\u0000\\u0007"}]}' % model.encode())
    assert control.status_code == 200, control.text
    parts = _post(served, key, {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Who keeps"}, {"type": "text", "text": "the Orrin lighthouse?"}]}]})
    assert parts.status_code == 200, parts.text
    streamed = httpx.post(served + "/v1/chat/completions", json=_chat(model, stream=True, max_tokens=8),
                          headers={"authorization": f"Bearer {key}"}, timeout=120)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]") and '"chat.completion.chunk"' in streamed.text
    cut = _post(served, key, _chat(model, q="Who keeps the Orrin lighthouse?", max_tokens=1)).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    one_word = _post(served, key, _chat(model, q="Lighthouse?")).json()
    assert one_word["usage"]["prompt_tokens"] > 5  # the templated prompt, not the one word
    for extra, param in (({"temperature": "hot"}, "temperature"), ({"n": 3}, "n")):
        r = _post(served, key, _chat(model, **extra))
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_memo_answer_past_its_deadline_is_a_504_not_a_hang(served, keys):
    t0 = time.time()
    r = _post(served, keys["both"], _chat("memo/lighthouse", memo_deadline_s=0.001))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout" and time.time() - t0 < 30


def test_tenants_reload_without_a_redeploy(served, keys):
    """A key added to the file works, a revoked one is refused, both within seconds; a malformed file
    is rejected and the keys in force keep working."""
    from memo.tenants import add_tenant, revoke_tenant

    def status_within(key, want, seconds=10):
        deadline = time.time() + seconds
        while True:
            got = _post(served, key, _chat("harbour", max_tokens=2)).status_code
            if got == want or time.time() > deadline:
                return got
            time.sleep(0.3)

    good = open(keys["file"]).read()
    try:
        new = add_tenant(keys["file"], "late-joiner", ["harbour"])
        assert status_within(new, 200) == 200
        revoke_tenant(keys["file"], "late-joiner")
        assert status_within(new, 401) == 401
        with open(keys["file"], "w") as f:
            f.write("tenants: [this is not a tenant list")
        time.sleep(1.5)  # past tenants_reload_s: the router has seen the bad file and kept the old tenants
        assert _post(served, keys["both"], _chat("harbour", max_tokens=2)).status_code == 200
    finally:
        with open(keys["file"], "w") as f:
            f.write(good)


@pytest.mark.parametrize("key, body, status, code", [
    (None, _chat("lighthouse"), 401, "invalid_api_key"),
    ("memo-sk-wrong", _chat("lighthouse"), 401, "invalid_api_key"),
    ("harbour", _chat("lighthouse"), 403, "model_not_allowed"),
    ("harbour", _chat("ghost"), 404, "model_not_found"),
    ("both", _chat("lighthouse", q="x" * 5000), 413, "prompt_too_large"),
    ("both", _chat("lighthouse", max_tokens=999), 400, None),
    ("both", {"model": "lighthouse"}, 400, None),
    (None, _chat("memo/lighthouse"), 401, "invalid_api_key"),
    ("harbour", _chat("memo/lighthouse"), 403, "model_not_allowed"),
    ("harbour", _chat("memo/ghost"), 404, "model_not_found"),
    ("both", _chat("memo/lighthouse", q="x" * 5000), 413, "prompt_too_large"),
    ("both", _chat("memo/lighthouse", memo_protocol="fancy"), 400, None),
])
def test_documented_errors_are_openai_shaped(served, keys, key, body, status, code):
    r = _post(served, keys.get(key, key), body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == code
    assert keys["both"] not in r.text


def test_rate_limit_gives_429_with_retry_after(served, keys):
    statuses = [_post(served, keys["slow"], _chat("harbour", max_tokens=2)).status_code for _ in range(3)]
    assert statuses[0] == 200 and statuses[-1] == 429  # burst of 1 at 6 requests/minute
    r = _post(served, keys["slow"], _chat("harbour"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_health_and_metrics_need_no_key_and_reveal_no_tenant(served, keys):
    assert httpx.get(served + "/healthz").json() == {"status": "ok"}
    m = httpx.get(served + "/metrics").text
    assert 'memo_requests_total{product="memory",status="200"}' in m or \
        'memo_requests_total{status="200",product="memory"}' in m, m
    assert 'status="401"' in m and 'product="memo"' in m
    assert "harbour-only" not in m and "rate-limited" not in m and keys["both"] not in m


def test_promotion_under_load_fails_no_request_and_is_audited(served, domains, keys):
    """Clients keep asking the memory and the MeMo answer while the champion moves v1 -> v2 (forced past
    the gate) and back by rollback: zero failures; once a reply carries the new version, no
    later-started request of that product gets the old."""
    from memo import registry
    from memo.promotion import promote, rollback

    log, stop = [], threading.Event()

    def client(model):
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                t0 = time.time()
                r = c.post(served + "/v1/chat/completions", json=_chat(model, max_tokens=4),
                           headers={"authorization": f"Bearer {keys['both']}"})
                log.append((model, t0, time.time(), r.status_code, r.headers.get("x-memo-model-version")))

    threads = [threading.Thread(target=client, args=(m,)) for m in ("lighthouse", "lighthouse", "memo/lighthouse")]
    for t in threads:
        t.start()
    time.sleep(3)
    report = promote("lighthouse", "champion", version=domains["v2"], force=True, qa_files=[domains["qa"]])
    assert report["gate"] == "failed" and report["forced"]
    deadline = time.time() + 90
    while time.time() < deadline and not all(any(m == model and v == domains["v2"] for m, *_, v in log)
                                             for model in ("lighthouse", "memo/lighthouse")):
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert log and all(status == 200 for *_, status, _ in log), [x for x in log if x[3] != 200][:3]
    for model in ("lighthouse", "memo/lighthouse"):
        mine = [x for x in log if x[0] == model]
        first_new_done = min(end for _, _, end, _, v in mine if v == domains["v2"])
        assert all(v == domains["v2"] for _, start, _, _, v in mine if start > first_new_done), model
        assert any(v == domains["v1"] for *_, v in mine), model

    st = registry.domain_status("lighthouse")
    spans = [s for s in st["serving_history"] if s["deployment"] == "MemoryModel"]
    assert [s["version"] for s in spans][-2:] == [domains["v1"], domains["v2"]]
    assert spans[-2]["until"] is not None and spans[-1]["until"] is None
    assert "FORCED" in st["alias_history"][-1]["reason"]
    out = run_cli("status", "--domain", "lighthouse")
    assert out.returncode == 0 and f"served v{domains['v1']} from" in out.stdout

    assert rollback("lighthouse")["version"] == domains["v1"]
    assert registry.resolve_version("lighthouse", "champion") == domains["v1"]


def test_gate_refuses_a_worse_candidate_and_leaves_the_alias(domains):
    from memo import registry

    before = registry.resolve_version("lighthouse", "champion")
    res = run_cli("promote", "--domain", "lighthouse", "--from", "candidate", "--to", "champion",
                  "--qa", domains["qa"])
    assert res.returncode == 3, res.stdout + res.stderr  # refused by the gate (2 is bad input)
    assert "promotion refused" in res.stderr and "--force" in res.stderr
    assert registry.resolve_version("lighthouse", "champion") == before


def test_synthesis_through_the_router_as_an_http_generator(served, keys, tmp_path, monkeypatch):
    """The http generator end to end against a real OpenAI-compatible server: this router, hosting a
    tiny model trained on four facts. Its replies are not the JSON asked for, so every row must land
    in the rejects with the reply, the job must finish, and each step's counts must add up."""
    import pandas as pd
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "Orrin", "text": "Mara Quill keeps the Orrin lighthouse."}) + "\n"
                      + json.dumps({"id": "b", "title": "Quill", "text": "Mara Quill was born on Tessel Island."}) + "\n")
    monkeypatch.setenv("MEMO_TEST_GENERATOR_KEY", keys["both"])
    cfg = build_config(SynthesizeConfig, {"domain": "routergen", "corpus": str(corpus), "out": str(tmp_path / "r"),
                                          "generator": "http", "base_url": served + "/v1", "model": "lighthouse",
                                          "api_key_env": "MEMO_TEST_GENERATOR_KEY", "max_tokens": 16, "workers": 1,
                                          "retries": 0, "json_retries": 0})
    stats = synthesize(cfg)
    rejects = pd.read_parquet(tmp_path / "r" / "rejects.parquet")
    ext = stats["steps"]["extract"]
    assert ext["in"] == 4 and ext["calls"] == 4 and ext["rejected"] + ext["out"] + ext["empty"] >= 4
    assert stats["steps"]["entity"]["calls"] == 2 and stats["groups"]["groups"] >= 1
    # real replies came back (no auth, size or server error): they are simply not JSON
    assert set(rejects.reason.str.split(":").str[0]) <= {"bad_json", "no_pairs_in_json", "empty_field"}, rejects.reason
    assert (rejects.raw.str.len() > 0).any() and stats["rows"] == len(pd.read_parquet(tmp_path / "r" / "reflections.parquet"))
    assert keys["both"] not in json.dumps(stats)  # the key stays out of what is written


def test_training_on_a_cluster_whose_cpus_serve_holds_fails_naming_them(served, domains, tiny_model, tmp_path):
    """The replicas above hold 1.5 of the 2 CPUs: a 1-worker training waits startup_timeout_s for a free
    CPU, then fails naming what is free and who holds the rest; nothing is registered."""
    import time

    import pandas as pd
    from memo import registry
    from memo.config import TrainConfig, build_config
    from memo.errors import MemoError
    from memo.synthesis.schema import COLUMNS
    from memo.training import train

    rows = [{"id": f"f{i}", "domain": "busy", "step": "direct", "question": q, "answer": a,
             "source_chunk_ids": ["x#0"], "generator": "rules", "verified": True} for i, (q, a) in enumerate(FACTS)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp_path / "reflections.parquet")
    t0 = time.monotonic()
    with pytest.raises(MemoError) as e:
        train(build_config(TrainConfig, {"domain": "busy", "reflections": str(tmp_path), "base_model": tiny_model,
                                         "startup_timeout_s": 3, "eval_sample": 0}))
    assert "stayed free for 3 s (train.startup_timeout_s)" in str(e.value)
    assert "held by ServeReplica:memo:" in str(e.value), str(e.value)
    assert time.monotonic() - t0 < 60
    assert "busy" not in registry.list_domains()
