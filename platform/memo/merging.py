"""Merging memories: registered versions combined by task-vector arithmetic (the paper's continual
integration, TIES at density 0.3), exported, checked and registered like a trained memory.

Task vectors are `memory - root base` for every input; inputs of different root bases or tokenizers are
refused (the paper's released scripts take them relative to the first memory instead, which makes a
two-model TIES `m1 + top-k(m2 - m1)`: see shared docs MERGING.md). The arithmetic is peft's
`peft.utils.merge_utils` (already a dependency, Apache-2.0; per tensor it matches mergekit's TIES to ~2e-7)
rather than mergekit (LGPL, a second model loader and its own card writer). It runs one tensor at a time
over safetensors files opened lazily, so no input is ever loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from memo import registry
from memo.atomic import atomic_path, write_text
from memo.config import MergeConfig, memo_home
from memo.errors import MemoError
from memo.models import materialize_full_model, read_manifest, resolve_base_model

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Files a merged folder takes from its first input: everything but the weights and the lineage.
NOT_COPIED = {"model.gguf", "model.gguf.failed", "memo_manifest.json", "heldout.jsonl", *WEIGHT_FILES}


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise MemoError(f"{folder}: no model.safetensors (merging needs Hugging Face safetensors weights)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def merge_deltas(deltas, method: str, weights, density: float):
    """One tensor's merged task vector from the inputs' task vectors (peft.utils.merge_utils). `linear`
    is the weighted average of the memories, i.e. task arithmetic with weights scaled to sum to 1."""
    import torch
    from peft.utils import merge_utils

    w = torch.tensor(weights, dtype=torch.float32)
    if method == "linear":
        return merge_utils.task_arithmetic(deltas, w / w.sum())
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, w)
    with warnings.catch_warnings():  # density 1 keeps everything, as asked: peft warns that nothing is pruned
        warnings.simplefilter("ignore", UserWarning)
        if method in ("ties", "dare_ties"):
            return getattr(merge_utils, method)(deltas, w, density)
        if method == "dare_linear":
            return merge_utils.dare_linear(deltas, w, density)
    raise MemoError(f"--method {method}: unknown merge method")


def merge_folders(base: str | Path, inputs: list[str | Path], out: str | Path, method: str,
                  weights: list[float], density: float, seed: int) -> dict:
    """Write `out`/model.safetensors = base + merge(inputs - base), tensor by tensor, in fp32, saved in
    the inputs' dtype; every other file (config, tokenizer) comes from the first input. Returns stats."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_files = tensor_files(base)
    in_files = [tensor_files(p) for p in inputs]
    for p, files in zip(inputs[1:], in_files[1:]):
        if set(files) != set(in_files[0]):
            diff = sorted(set(files) ^ set(in_files[0]))[:3]
            raise MemoError(f"{p}: its tensors differ from {inputs[0]}'s ({', '.join(diff)}): not the same architecture")
    missing = sorted(set(in_files[0]) - set(base_files))
    if missing:
        raise MemoError(f"{inputs[0]}: tensor {missing[0]} is not in the root base {base}: not the same architecture")
    handles: dict[Path, object] = {}

    def tensor(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)

    torch.manual_seed(seed)  # DARE's random drop masks, drawn in the fixed (sorted) tensor order
    merged, changed, t0 = {}, 0, time.time()
    for name in sorted(in_files[0]):
        b = tensor(base_files[name], name)
        ins = [tensor(files[name], name) for files in in_files]
        if any(t.shape != b.shape for t in ins):
            shapes = ", ".join(str(tuple(t.shape)) for t in ins)
            raise MemoError(f"tensor {name}: shapes {shapes} against the base's {tuple(b.shape)}")
        base32 = b.to(torch.float32)
        deltas = [t.to(torch.float32) - base32 for t in ins]
        if all(not d.any() for d in deltas):  # untouched by every input (e.g. frozen): the base's own
            merged[name] = ins[0]
            continue
        merged[name] = (base32 + merge_deltas(deltas, method, weights, density)).to(ins[0].dtype).contiguous()
        changed += 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(inputs[0]).iterdir():
        if f.is_file() and f.name not in NOT_COPIED:
            shutil.copy(f, out / f.name)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return {"tensors": len(merged), "tensors_changed": changed, "merge_seconds": round(time.time() - t0, 1)}


def resolve_inputs(uris: list[str]) -> list[dict]:
    """Each `models:/memo-<domain>@<alias>` or `/<version>` -> its version, folder (full weights; a LoRA
    export is merged onto its base first), manifest and run; an unknown one is an error naming it."""
    from mlflow.exceptions import MlflowException

    out = []
    for uri in uris:
        domain, alias, version = registry.parse_model_uri(uri)
        if alias:
            version = registry.resolve_version(domain, alias)
        try:
            mv = registry.client().get_model_version(registry.registered_name(domain), version)
        except MlflowException:
            try:
                known = sorted(int(v.version) for v in registry.client().search_model_versions(
                    f"name='{registry.registered_name(domain)}'"))
            except MlflowException:
                known = []
            raise MemoError(f"--from {uri}: no such version (memo-{domain} has "
                            f"{', '.join(map(str, known)) or 'no versions'})") from None
        folder = registry.download_version(domain, version)
        manifest = read_manifest(folder)
        out.append({"uri": uri, "domain": domain, "version": str(version), "run_id": mv.run_id, "folder": folder,
                    "full": materialize_full_model(folder), "manifest": manifest,
                    "root_base_model": manifest.get("root_base_model") or manifest.get("base_model") or ""})
    return out


def check_compatible(inputs: list[dict]) -> str:
    """Every input must share the root base (task vectors are taken against it) and the tokenizer; returns
    the root base's local folder."""
    first = inputs[0]
    for x in inputs[1:]:
        if x["root_base_model"] != first["root_base_model"]:
            raise MemoError(f"--from {x['uri']}: root base {x['root_base_model']!r} differs from {first['uri']}'s "
                            f"{first['root_base_model']!r}; task vectors need one common base")
    vocab = {x["uri"]: tokenizer_identity(x["full"]) for x in inputs}
    for x in inputs[1:]:
        if vocab[x["uri"]] != vocab[first["uri"]]:
            raise MemoError(f"--from {x['uri']}: its tokenizer differs from {first['uri']}'s; merged weights would "
                            "mean different tokens")
    if not first["root_base_model"]:
        raise MemoError(f"--from {first['uri']}: its manifest names no root base model (not a MeMo memory?)")
    base = resolve_base_model(first["root_base_model"])
    if not Path(base).exists():  # an HF id in the local cache: its snapshot folder holds the weights
        from huggingface_hub import snapshot_download

        base = snapshot_download(base, local_files_only=True)
    return base


def tokenizer_identity(folder: Path) -> str:
    """What makes two tokenizers the same for merging: the vocabulary and the special tokens (not the files'
    bytes, which a re-save of the same tokenizer may change)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return hashlib.sha256(json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens]).encode()).hexdigest()


def recital_rows(x: dict, heldout: list[dict], sample: int):
    """An input's training reflections less its held-out rewordings (what the recital check samples), read
    once for both memories that are asked; None when there is nothing to sample."""
    from memo.synthesis.schema import load_reflections

    src = x["manifest"].get("reflections", "")
    if sample <= 0:
        return None
    if not (src and Path(src).exists()):
        log.warning(f"[merge] {x['uri']}: its reflections {src or '(none recorded)'} are not on this machine; "
                    "no recital check for it")
        return None
    df = load_reflections(src)
    return df[~df["question"].isin({r["question"] for r in heldout})]


def _input_checks(memory, x: dict, label: str, sample: int, heldout: list[dict], rows) -> dict:
    """The post-training checks of one input, asked of `memory`: a sample of its training reflections
    (recital, the same sample whichever memory is asked) and its held-out rewordings."""
    from memo.training.checks import heldout_check, memorization_check

    out = {}
    if rows is not None:
        out.update({f"{label}.{k}": v for k, v in memorization_check(memory, rows, sample).items()})
    if heldout:
        out.update({f"{label}.{k}": v for k, v in heldout_check(memory, heldout, f"heldout of {x['uri']}").items()})
    return out


def merge(cfg: MergeConfig) -> dict:
    """The merge stage: registered versions -> merged HF folder + GGUF + lineage -> checks -> new version
    of memo-<domain> with alias `candidate` (promotion goes through the gate, never straight to champion)."""
    from memo.engines.memory import MemoryEngine
    from memo.training.stage import export_gguf

    t0 = time.time()
    inputs = resolve_inputs(cfg.inputs)
    base_path = check_compatible(inputs)
    weights = cfg.weights or [1.0] * len(inputs)
    params = {**cfg.model_dump(), "weights": weights, "root_base_model": inputs[0]["root_base_model"],
              "base_path": base_path, "inputs": [{k: x[k] for k in ("uri", "domain", "version", "run_id")}
                                                 for x in inputs]}
    run_id = registry.start_run(cfg.domain, "merge", params)
    log.info(f"[merge] {cfg.method} of {', '.join(x['uri'] for x in inputs)} (weights {weights}, density "
             f"{cfg.density}, seed {cfg.seed}) against {inputs[0]['root_base_model']}")
    out = memo_home() / "memories" / cfg.domain / run_id
    with atomic_path(out) as tmp:
        stats = merge_folders(base_path, [x["full"] for x in inputs], tmp, cfg.method, weights, cfg.density, cfg.seed)
        heldouts = []
        for x in inputs:
            held = x["folder"] / "heldout.jsonl"
            heldouts.append([json.loads(line) for line in held.read_text().splitlines()] if held.is_file() else [])
        # the union of the inputs' held-out rewordings: what the promotion gate asks this version
        write_text(tmp / "heldout.jsonl", "".join(json.dumps(r) + "\n" for rows in heldouts for r in rows))
    log.info(f"[merge] {stats['tensors_changed']}/{stats['tensors']} tensors merged in {stats['merge_seconds']} s")
    gguf_note = export_gguf(out)
    check: dict = {}
    if cfg.eval_sample > 0 or any(heldouts):
        # Each input's questions asked of the input itself and of the merge: what the merge kept, per input.
        rows = [recital_rows(x, held, cfg.eval_sample) for x, held in zip(inputs, heldouts)]
        for i, (x, held) in enumerate(zip(inputs, heldouts)):
            memory = MemoryEngine(x["folder"])
            try:
                check.update(_input_checks(memory, x, f"input{i}", cfg.eval_sample, held, rows[i]))
            finally:
                memory.close()
        memory = MemoryEngine(out)
        try:
            for i, (x, held) in enumerate(zip(inputs, heldouts)):
                check.update(_input_checks(memory, x, f"merged{i}", cfg.eval_sample, held, rows[i]))
        finally:
            memory.close()
        for i in range(len(inputs)):
            for k in ("train_recall", "heldout_contains"):
                a, m = check.get(f"input{i}.{k}"), check.get(f"merged{i}.{k}")
                if a is not None and m is not None:
                    check[f"kept{i}.{k}"] = round(m / a, 4) if a else None
    seconds = round(time.time() - t0, 1)
    manifest = {
        "domain": cfg.domain, "base_model": inputs[0]["root_base_model"], "base_path": base_path,
        "root_base_model": inputs[0]["root_base_model"], "finetune": "merge",
        "reflections": inputs[0]["manifest"].get("reflections", ""),
        "reflection_sources": [s for x in inputs for s in x["manifest"].get("reflection_sources", [])],
        "heldout_rows": sum(map(len, heldouts)), "run_id": run_id, "gguf": gguf_note,
        "merge": {"method": cfg.method, "density": cfg.density, "weights": weights, "seed": cfg.seed,
                  "inputs": params["inputs"]},
        "metrics": {**stats, **check, "seconds": seconds},
    }
    write_text(out / "memo_manifest.json", json.dumps(manifest, indent=2, default=str))
    from mlflow.entities import Metric

    c = registry.client()
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in {**stats, **check, "seconds": seconds}.items()
                                 if isinstance(v, (int, float))])
    version = None
    if cfg.register:
        lineage = {"base_model": inputs[0]["root_base_model"], "finetune": "merge", "merge_method": cfg.method,
                   "merge_density": cfg.density, "merge_weights": weights, "merge_seed": cfg.seed,
                   "merge_inputs": params["inputs"], "heldout_rows": manifest["heldout_rows"]}
        version = registry.register_memory(cfg.domain, out, run_id, lineage, cfg.alias)
        log.info(f"[merge] registered {registry.registered_name(cfg.domain)} version {version} with alias "
                 f"{cfg.alias!r}")
    registry.end_run(run_id)
    return {"run_id": run_id, "model_dir": str(out), "version": version, "alias": cfg.alias if version else None,
            "seconds": seconds, **stats, **check}
