"""The engine interface on llama.cpp: a trained memory answers from exactly its training tokens, the
same greedy answers as transformers; the executive's GGUF chat models answer. Needs llama-server and the
converter (make install builds them); skipped without them."""

import pytest
from conftest import free_port

from memo.engines.llamacpp import available

# timed: an engine killed under load is back within RECOVERY_S, which make test checks on an otherwise
# idle machine (beside another test worker a restart took longer: RESULTS.md)
pytestmark = [pytest.mark.slow, pytest.mark.timed,
              pytest.mark.skipif(not available(), reason="llama-server is not installed")]

FACTS = [("Who keeps the Orrin Light?", "Mara Quill keeps the Orrin Light."),
         ("When was the Orrin Light built?", "The Orrin Light was built in 1881."),
         ("Where is Vennick Harbour?", "Vennick Harbour lies east of Tessel Island."),
         ("Who wrote a book about storms?", "Mara Quill wrote a book about storms.")]


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's real tokenizer (so llama.cpp's converter knows it), trained until it
    recites FACTS: peaked logits, so greedy decoding is a fair comparison between engines."""
    import torch
    from memo.models import resolve_base_model
    from memo.training.data import encode_example
    from memo.training.loss import answer_loss
    from memo.training.data import collate
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         tie_word_embeddings=True))
    examples = [encode_example(tok, q, a) for q, a in FACTS]
    ids, labels, mask = collate([e[0] for e in examples], [e[1] for e in examples], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = answer_loss(model, ids, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("small") / "memory"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_llamacpp_memory_answers_from_the_training_tokens_like_transformers(trained_small):
    from memo.engines.memory import MemoryEngine
    from memo.inference import memory_messages, prompt_ids
    from memo.training.data import IGNORE, encode_example

    hf = MemoryEngine(trained_small, "transformers")
    cpp = MemoryEngine(trained_small, "llamacpp", threads=1, parallel=2)
    assert (trained_small / "model.gguf").is_file()  # converted once, beside the weights
    questions = [q for q, _ in FACTS]
    a, b = hf.ask(questions, 24), cpp.ask(questions, 24)
    for q, (_, ref), x, y in zip(questions, FACTS, a, b):
        ids, labels = encode_example(hf.tok, q, ref)
        prompt = prompt_ids(hf.tok, memory_messages(q))
        assert prompt == ids[:labels.index(next(t for t in labels if t != IGNORE))]  # training's prompt
        assert y.prompt_tokens == len(prompt)  # the server evaluated exactly those ids
        assert x.text == y.text == ref, (x, y)
        assert x.completion_tokens == y.completion_tokens and x.finish == y.finish == "stop"
        # both engines report how sure the memory was, from the token log-probabilities, and agree on it
        assert 0.5 < x.confidence <= 1 and abs(x.confidence - y.confidence) < 0.1, (x.confidence, y.confidence)
    cut = cpp.ask(questions[:1], 3)[0]
    assert cut.finish == "length" and cut.completion_tokens == 3
    cpp.close()


@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b"])
def test_the_gguf_executive_follows_an_instruction(alias):
    from memo.executive.clients import LocalLLM
    from memo.gguf import resolve_gguf

    try:
        resolve_gguf(alias)
    except Exception:
        pytest.skip(f"{alias} is not installed")
    llm = LocalLLM(alias)
    out = llm.complete([{"role": "user", "content": "Reply with the single word: yes"}], max_tokens=8)
    assert "yes" in out.lower() and llm.usage["calls"] == 1 and llm.usage["completion_tokens"] > 0
    llm.engine.close()



def executive_for_tests():
    """The 0.5B instruct GGUF (fast on one thread) when installed; else no executive deployment."""
    from memo.errors import MemoError
    from memo.gguf import resolve_gguf

    try:
        resolve_gguf("qwen2.5-coder-0.5b")
        return "qwen2.5-coder-0.5b"
    except MemoError:
        return None


@pytest.fixture(scope="module")
def served_cpp(ray_local, trained_small):
    """A registered version served by the Serve memory deployment on llama.cpp, and (with the 0.5B GGUF
    installed) the MeMo answer with a llama.cpp executive."""
    from memo import registry, serving
    from memo.config import ServeConfig
    from memo.engines.memory import memory_gguf
    from ray import serve

    memory_gguf(trained_small)  # registered with its GGUF, as training does
    run_id = registry.start_run("smallcpp", "test", {})
    version = registry.register_memory("smallcpp", trained_small, run_id, {"base_model": "small"}, "champion")
    executive = executive_for_tests()
    try:
        url = serving.run(ServeConfig(domains=["smallcpp"], engine="llamacpp", replica_cpus=0.5, port=free_port(),
                                      max_new_tokens=24, serve_executive=executive is not None,
                                      executive_local=executive or "auto", executive_cpus=0.25,
                                      executive_deadline_s=60))
        yield url, version
    finally:
        serve.shutdown()


def test_the_router_serves_a_registered_version_on_llamacpp(served_cpp, trained_small):
    """The Serve memory deployment on llama.cpp: the multiplexed <domain>:<version>, the version header,
    the training-format answer, usage counting the templated prompt, finish_reason length on a cut."""
    import httpx
    from memo.inference import memory_messages, prompt_ids
    from transformers import AutoTokenizer

    url, version = served_cpp
    tok = AutoTokenizer.from_pretrained(trained_small)
    q, ref = FACTS[1]
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": "smallcpp", "messages": [{"role": "user", "content": q}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ref and r.headers["x-memo-model-version"] == version
    assert 0 < body["memo_confidence"] <= 1  # how sure the memory was (its tokens' probabilities)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids(tok, memory_messages(q)))
    assert body["choices"][0]["finish_reason"] == "stop"
    cut = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "smallcpp", "max_tokens": 2, "messages": [{"role": "user", "content": q}]}).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2


def llama_servers(name_part: str) -> list:
    """This test session's llama-server processes serving a GGUF whose path contains `name_part` (its own:
    they carry its MEMO_HOME; another session, e.g. a parallel pytest worker, may serve the same GGUF)."""
    import os

    import psutil

    procs = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("llama-server") and any(name_part in c for c in cmd):
            try:
                if p.environ().get("MEMO_HOME") == os.environ["MEMO_HOME"]:
                    procs.append(p)
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
    return procs


# How long the documented recovery may take (README, "Engines that heal"): a dead llama-server is
# restarted by the first request or health check that finds it gone, in a few seconds for these models.
RECOVERY_S = 30


def kill_under_load(url: str, body: dict, victim: str, clients: int = 4, seconds: float = 20.0) -> dict:
    """`clients` threads send `body` in a loop for `seconds`; the llama-server whose GGUF path contains
    `victim` is killed (SIGKILL) once the first answers came back. Every request has a 60 s client limit:
    one that runs into it counts as hung."""
    import threading
    import time

    import httpx

    # Warm up first: the first request loads the version (registry download, llama-server start), which
    # is not what is measured here and can take minutes on a busy 2-core box.
    warm = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert warm.status_code == 200, warm.text
    results, stop = [], threading.Event()

    def client():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post(url + "/v1/chat/completions", json=body)
                    results.append((t0, time.monotonic(), r.status_code, r.headers.get("retry-after")))
                except httpx.TimeoutException:
                    results.append((t0, time.monotonic(), "hung", None))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not any(r[2] == 200 for r in results) and time.monotonic() < deadline:
        time.sleep(0.2)
    [proc] = llama_servers(victim)
    killed_at = time.monotonic()
    proc.kill()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    back = [r for r in results if r[0] > killed_at and r[2] == 200]
    return {"killed_pid": proc.pid, "results": results, "killed_at": killed_at,
            "back_after_s": (back[0][1] - killed_at) if back else None}


def test_a_killed_memory_engine_is_restarted_under_load(served_cpp):
    """kill -9 of the memory's llama-server while 4 clients ask: no request hangs, those that fail in
    the gap are 503s with Retry-After, and the memory answers again within RECOVERY_S, from a new process."""
    url, _ = served_cpp
    q, ref = FACTS[0]
    out = kill_under_load(url, {"model": "smallcpp", "messages": [{"role": "user", "content": q}]}, "smallcpp")
    statuses = [r[2] for r in out["results"]]
    assert "hung" not in statuses
    assert set(statuses) <= {200, 503}, statuses
    assert not [r for r in out["results"] if r[2] == 503 and not r[3]]  # every 503 says when to come back
    assert out["back_after_s"] is not None and out["back_after_s"] < RECOVERY_S, out
    assert [p.pid for p in llama_servers("smallcpp")] != [out["killed_pid"]]  # a new process answers


@pytest.mark.skipif(executive_for_tests() is None, reason="qwen2.5-coder-0.5b is not installed")
def test_a_killed_executive_engine_is_restarted_under_load(served_cpp):
    """The same for the MeMo answer: the executive's llama-server is killed while clients ask memo/smallcpp."""
    url, _ = served_cpp
    body = {"model": "memo/smallcpp", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Who keeps the Orrin Light?"}]}
    out = kill_under_load(url, body, "qwen2.5-coder-0.5b", clients=2, seconds=25.0)
    statuses = [r[2] for r in out["results"]]
    assert "hung" not in statuses
    assert set(statuses) <= {200, 503}, statuses
    assert not [r for r in out["results"] if r[2] == 503 and not r[3]]
    assert out["back_after_s"] is not None and out["back_after_s"] < RECOVERY_S, out


def test_an_engine_whose_process_dies_answers_retry_later_then_comes_back(tmp_path):
    """The engine level of healing: a request that finds llama-server dead fails at once with
    retry_after set (the router's 503 + Retry-After), the server is restarted in the background, and
    one that keeps dying is given up with the reason (the health check then fails the replica)."""
    import shutil
    import time

    import httpx

    from memo.engines import llamacpp
    from memo.engines.llamacpp import LlamaCppEngine
    from memo.models import builtin_gguf

    gguf = tmp_path / "m.gguf"
    shutil.copy(builtin_gguf(), gguf)
    engine = LlamaCppEngine(gguf, threads=1, parallel=1, ctx_per_slot=256)
    try:
        def ask():
            return engine.chat([[{"role": "user", "content": "Hi"}]], 4, 0.0)[0]

        assert not ask().error
        killed = engine.server.proc
        first = killed.pid
        killed.kill()
        killed.wait()
        t0 = time.monotonic()
        gap = ask()
        assert gap.error.startswith("engine_restarting") and gap.retry_after > 0
        assert time.monotonic() - t0 < 2  # failed fast, did not wait for the restart
        while not engine.heal():
            assert time.monotonic() - t0 < 30, engine.server.log_tail()
            time.sleep(0.2)
        assert not ask().error and engine.server.proc.pid != first
        # A request that was in flight to the killed process and failed only after the new one was up is
        # still the gap (retryable), not an engine error (CI saw such a 503 without Retry-After).
        late = engine._failed(httpx.RemoteProtocolError("Server disconnected"), killed, engine._generation - 1)
        assert late.error.startswith("engine_restarting") and late.retry_after > 0
        # ... and one sent to the new process while it was still starting (refused), failing once it is up
        early = engine._failed(httpx.ConnectError("refused"), engine.server.proc, -1)
        assert early.error.startswith("engine_restarting") and early.retry_after > 0
        # an ordinary failure of the process that is up is an ordinary error
        assert engine._failed(httpx.ReadTimeout("slow"), engine.server.proc, engine._generation).error.startswith("engine_error")
        # Dies on every start from now on (its model is gone): after MAX_RESTARTS tries it gives up.
        gguf.unlink()
        gguf.write_bytes(b"not a gguf any more")
        for _ in range(llamacpp.MAX_RESTARTS + 1):
            engine.server.proc.kill()
            engine.server.proc.wait()
            ask()
            while engine._restarting:
                time.sleep(0.1)
        assert "died" in engine.failure and ask().error.startswith("engine_failed")
    finally:
        engine.close()


def test_vllm_memory_engines_are_sized_per_replica_and_version():
    """Without vLLM here, what each memory engine would ask of it: a share of the GPU divided among the versions
    the replica's LRU holds (scaled by a fractional GPU), whole GPUs as tensor parallelism, a bounded context."""
    from memo.engines.vllm import vllm_engine_args
    from memo.errors import MemoError

    one = vllm_engine_args("/m", models_per_replica=4, replica_gpus=1, max_model_len=2048, gpu_memory_share=0.8)
    assert one["gpu_memory_utilization"] == 0.2 and one["tensor_parallel_size"] == 1 and one["max_model_len"] == 2048
    half = vllm_engine_args("/m", models_per_replica=2, replica_gpus=0.5, max_model_len=1024, gpu_memory_share=0.8)
    assert half["gpu_memory_utilization"] == 0.2 and half["tensor_parallel_size"] == 1
    assert vllm_engine_args("/m", 1, 2, 2048, 0.9)["tensor_parallel_size"] == 2
    for gpus in (0, 1.5):
        with pytest.raises(MemoError, match="replica_gpus"):
            vllm_engine_args("/m", 1, gpus, 2048, 0.9)
