"""The engine interface on llama.cpp: a trained memory answers from exactly its training tokens, the
same greedy answers as transformers; the executive's GGUF chat models answer. Needs llama-server and the
converter (make install builds them); skipped without them."""

import pytest

from memo.engines.llamacpp import available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="llama-server is not installed")]

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


def test_the_router_serves_a_registered_version_on_llamacpp(ray_local, trained_small):
    """The Serve memory deployment on llama.cpp: the multiplexed <domain>:<version>, the version header,
    the training-format answer, usage counting the templated prompt, finish_reason length on a cut."""
    import socket

    import httpx
    from memo import registry, serving
    from memo.config import ServeConfig
    from memo.inference import memory_messages, prompt_ids
    from ray import serve
    from transformers import AutoTokenizer

    from memo.engines.memory import memory_gguf

    memory_gguf(trained_small)  # registered with its GGUF, as training does
    run_id = registry.start_run("smallcpp", "test", {})
    version = registry.register_memory("smallcpp", trained_small, run_id, {"base_model": "small"}, "champion")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = serving.run(ServeConfig(domains=["smallcpp"], engine="llamacpp", replica_cpus=0.5, port=port,
                                  max_new_tokens=24))
    try:
        tok = AutoTokenizer.from_pretrained(trained_small)
        q, ref = FACTS[1]
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": "smallcpp", "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == ref and r.headers["x-memo-model-version"] == version
        assert body["usage"]["prompt_tokens"] == len(prompt_ids(tok, memory_messages(q)))
        assert body["choices"][0]["finish_reason"] == "stop"
        cut = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "smallcpp", "max_tokens": 2, "messages": [{"role": "user", "content": q}]}).json()
        assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2
    finally:
        serve.shutdown()
