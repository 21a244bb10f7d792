"""The MEMORY model: SFT data, the Ray Train loop (FSDP2 on gloo or NCCL), export and inference.

Train as you serve: `memory_messages` is the one prompt format used by training, by the Serve
deployment and by the executive, so the model is never queried in a format it was not trained on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from memo.errors import MemoError

# Short on purpose: it is part of every training example (tokens cost CPU time) and without any system
# message SmolLM2's template injects its own ~20-token default. Abstention is taught by the `abstain`
# reflections themselves, in this same format.
MEMORY_SYSTEM_PROMPT = "Answer from memory."
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def memory_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": MEMORY_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def check_chat_template(tok, where: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise MemoError(f"{where}: the tokenizer has no chat template; use an instruct/chat model "
                        "(or add a chat_template to its tokenizer_config.json)")


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def encode_example(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """input_ids and labels for one reflection: loss on the answer and its end-of-turn token only.

    The answer is appended to the templated prompt token by token (not re-templated), so the prompt the
    model trains on is byte-identical to what `generate` sends at inference time.
    """
    p = prompt_ids(tok, memory_messages(question))
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [IGNORE] * len(p) + a


def tokenize_reflections(df: pd.DataFrame, tok, max_seq_len: int) -> tuple[pd.DataFrame, int]:
    """Tokenize every reflection; over-long examples are dropped (never truncated: a cut answer teaches
    a wrong fact) and counted."""
    ids, labels = [], []
    for q, a in zip(df["question"], df["answer"]):
        i, l = encode_example(tok, q, a)
        ids.append(i)
        labels.append(l)
    out = pd.DataFrame({"input_ids": ids, "labels": labels})
    keep = out["input_ids"].map(len) <= max_seq_len
    return out[keep].reset_index(drop=True), int((~keep).sum())


def default_schedule(n_params: float, n_rows: int, recipe: str = "auto", finetune: str = "full") -> tuple[int, float, str]:
    """Epochs and learning rate when the user sets neither.

    The paper's full-SFT recipe (3 epochs, lr 2e-5; LoRA 2e-4) is for a 14B model on ~1M pairs. A ~100M
    model on a few hundred pairs barely moves at 2e-5: measured on SmolLM2-135M, 60 facts x 4 epochs
    recalled 7/60 at 2e-5 and 41/60 at 3e-4, and 12 epochs at 3e-4 recalled 59/60. The rules generator
    asks each demo fact 3-5 ways (direct, indirect, entity, consolidated, cross-document), so every fact
    is seen ~20 times in 6 epochs. LoRA moves fewer weights and takes a higher rate (10x, as in the
    paper's own full/LoRA pair); the small-model LoRA rate is that ratio applied, not a measured optimum.
    """
    lora = finetune == "lora"
    if recipe == "paper" or n_params >= 1e9:
        return 3, (2e-4 if lora else 2e-5), "paper recipe: 3 epochs, lr " + ("2e-4 (LoRA)" if lora else "2e-5")
    if n_rows < 20_000:
        return 6, (1e-3 if lora else 3e-4), "small model and corpus: 6 epochs at a high rate (paper's 2e-5 x 3 barely memorizes at this size)"
    return 4, (1e-3 if lora else 1e-4), "small model, larger corpus: 4 epochs"


def length_grouped_batches(data: pd.DataFrame, batch_size: int, workers: int) -> pd.DataFrame:
    """Group examples of similar length into micro-batches, one micro-batch per row.

    Padding is pure waste on CPU; sorting by length first removes almost all of it. The number of
    micro-batches is a multiple of `workers`, so Ray Data's equal split drops no example.
    """
    order = sorted(range(len(data)), key=lambda i: len(data["input_ids"][i]))
    n = math.ceil(len(order) / batch_size)
    n = math.ceil(n / workers) * workers
    bounds = [round(k * len(order) / n) for k in range(n + 1)]
    groups = [order[bounds[k]:bounds[k + 1]] for k in range(n)]
    out = {"input_ids": [[list(data["input_ids"][i]) for i in g] for g in groups],
           "labels": [[list(data["labels"][i]) for i in g] for g in groups]}
    if "position_ids" in data.columns:
        out["position_ids"] = [[list(data["position_ids"][i]) for i in g] for g in groups]
    return pd.DataFrame(out)


def collate(ids_list, labels_list, pad_id: int, pos_list=None):
    """Right-pad one micro-batch; padding never carries loss or attention.

    Packed rows (several examples per row) also carry position ids that restart at 0 for every
    example; `packed_mask` turns the restarts into a block-diagonal causal mask, so no example attends
    to another. Padding gets its own block.
    """
    import torch

    n = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), n), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for r, (i, l) in enumerate(zip(ids_list, labels_list)):
        ids[r, : len(i)] = torch.as_tensor(list(i))
        labels[r, : len(l)] = torch.as_tensor(list(l))
        mask[r, : len(i)] = 1
    if pos_list is None:
        return ids, labels, mask
    pos = torch.zeros_like(ids)
    for r, p in enumerate(pos_list):
        pos[r, : len(p)] = torch.as_tensor(list(p))
        pos[r, len(p):] = torch.arange(n - len(p))
    return ids, labels, mask, pos


def pack_examples(data: pd.DataFrame, max_seq_len: int) -> pd.DataFrame:
    """Sequence packing: examples placed first-fit (longest first) into rows of <= max_seq_len tokens,
    with position ids restarting at each example. Returns rows like `data` plus `position_ids` and
    `examples` (how many examples a row holds)."""
    order = sorted(range(len(data)), key=lambda i: -len(data["input_ids"][i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(data["input_ids"][i])
        k = next((r for r, free in enumerate(room) if free >= n), None)
        if k is None:
            rows.append([i])
            room.append(max_seq_len - n)
        else:
            rows[k].append(i)
            room[k] -= n
    return pd.DataFrame({
        "input_ids": [[t for i in r for t in data["input_ids"][i]] for r in rows],
        "labels": [[t for i in r for t in data["labels"][i]] for r in rows],
        "position_ids": [[p for i in r for p in range(len(data["input_ids"][i]))] for r in rows],
        "examples": [len(r) for r in rows],
    })


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 where the hardware has bf16 matmul units, else fp32.

    Measured on 2-core CPUs: with AVX512-BF16 bf16 autocast is ~1.4x faster than fp32, but on an
    AVX2-only CPU a bf16 matmul ran at ~1 GFLOP/s against ~157 GFLOP/s in fp32 (160x slower).
    """
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def packed_mask(model, position_ids):
    """4D causal mask that keeps each packed example to itself: token q may attend to token k only when
    k <= q and both belong to the same example (a new example starts where the position ids restart).

    Built here rather than left to transformers: its packed-sequence detection (position ids, no mask)
    only remaps positions in its causal mask, which still lets a later example attend to an earlier one
    (measured: the loss matched the unmasked row, not the separate examples). A 4D mask is used as is.
    """
    import torch

    seg = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    n = position_ids.size(1)
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed  # SDPA takes a boolean mask (True = attend) in any compute dtype
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def answer_loss(model, ids, labels, mask, reduction: str = "mean", position_ids=None):
    """Mean next-token loss over answer tokens, computing vocabulary logits only where they count.

    The LM head (49k x 576 for SmolLM2, ~21% of the model's FLOPs) and the softmax are applied only to
    positions that predict an answer token, not to the prompt: by FLOP count ~10-15% less work per step
    for the demo's prompt/answer split (estimated, not benchmarked), and far less memory for logits.
    Equal to the model's own loss (tests check it).
    """
    import torch.nn.functional as F

    targets_at = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(-1)  # positions p predicting p+1
    if position_ids is not None:  # packed rows: an explicit block-diagonal causal mask
        logits = model(input_ids=ids, position_ids=position_ids, attention_mask=packed_mask(model, position_ids),
                       logits_to_keep=targets_at).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=targets_at).logits
    targets = labels[:, targets_at + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def target_count(labels) -> int:
    """Answer tokens that carry loss in a micro-batch (each label predicts from the position before it)."""
    return int((labels[:, 1:] != IGNORE).sum())


def accumulation_step(model, micro_batches: list, autocast: bool = False, world: int = 1) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step (gradient accumulation).

    Each micro-batch's summed loss is divided by the answer-token count of the whole step over all
    workers, so the gradient equals the one of a single big batch however the examples were split;
    data-parallel gradient averaging divides by `world`, hence the factor. With FSDP, gradients are
    reduce-scattered once, after the last micro-batch. Returns (mean loss over this worker's tokens,
    this worker's tokens processed).
    """
    import torch
    import torch.distributed as dist

    counts = torch.tensor([float(sum(target_count(mb[1]) for mb in micro_batches))], device=micro_batches[0][0].device)
    if world > 1:
        dist.all_reduce(counts)
    scale = world / max(float(counts[0]), 1.0)
    total, local_targets, tokens = 0.0, 0, 0
    for k, (ids, labels, mask, *pos) in enumerate(micro_batches):
        if world > 1 and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = answer_loss(model, ids, labels, mask, reduction="sum", position_ids=pos[0] if pos else None)
        (loss * scale).backward()
        total += float(loss.detach())
        local_targets += target_count(labels)
        tokens += int(mask.sum())
    return total / max(local_targets, 1), tokens


def decoder_layers(model) -> list:
    """The repeated transformer blocks (the FSDP units), found by structure so peft-wrapped and other
    architectures work too: the first non-empty ModuleList named `...layers`/`...h`/`...blocks`."""
    import torch.nn as nn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return list(mod)
    raise MemoError("cannot find the model's decoder layers (a ModuleList named layers, h or blocks) to shard")


def lora_config(cfg: dict):
    from peft import LoraConfig

    # all-linear: every attention and MLP projection, not the output head (as the paper's LoRA runs).
    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: FSDP2-sharded SFT with resumable checkpoints; rank 0 exports the final model."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device = ray.train.torch.get_device() if cfg["device"] == "cuda" else torch.device("cpu")

    model = AutoModelForCausalLM.from_pretrained(cfg["base_path"], dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    if cfg.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.get("finetune") == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
        if rank == 0:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"[train] LoRA r={cfg['lora_r']}: {n_train / 1e6:.2f}M trainable parameters", flush=True)
    model.to(device)
    if world > 1:
        # FSDP2: shard each decoder layer, then the root (embeddings, final norm, tied head). On CPU,
        # prepare_model(parallel_strategy="fsdp") refuses and FSDP1 needs device_id; FSDP2 works on
        # gloo. With one worker there is nothing to shard and the all-gather/reduce-scatter copies are
        # pure overhead, so the model stays a plain module (the state-dict calls below handle both).
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup_steps"]))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    step, epoch, skip = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            if not (Path(d) / "train_state.pt").exists():
                return  # the latest checkpoint is the exported final model: this run already finished
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, opt, state["optim"], options=full)
        sched.load_state_dict(state["sched"])
        step, epoch, skip = state["step"], state["epoch"], state["step_in_epoch"]
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {step} (epoch {epoch + 1}, batch {skip})", flush=True)

    def save(step_in_epoch: int, metrics: dict, final: bool = False) -> None:
        # Every rank takes part in gathering the full state; only rank 0 writes and reports a checkpoint.
        msd = get_model_state_dict(model, options=full)
        osd = None if final else get_optimizer_state_dict(model, opt, options=full)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0 and final:
                export_model(msd, cfg, Path(d) / "model")  # a finished run needs no optimizer state
            elif rank == 0:
                torch.save({"model": msd, "optim": osd, "sched": sched.state_dict(), "step": step,
                            "epoch": epoch, "step_in_epoch": step_in_epoch}, Path(d) / "train_state.pt")
            if rank == 0:
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    mlflow_client = None
    if rank == 0 and cfg.get("mlflow_run_id"):
        import mlflow

        mlflow_client = mlflow.MlflowClient(cfg["tracking_uri"])
    shard = ray.train.get_dataset_shard("train")
    total, t_start, tokens_seen, loss_val = cfg["total_steps"], time.time(), 0, float("nan")
    first_step_s, t_steady, tokens_at_steady = 0.0, t_start, 0
    start_step = step
    autocast = cfg["precision"] == "bf16"
    accum = cfg.get("accum", 1)
    while epoch < cfg["epochs"]:
        # One row is one length-grouped micro-batch; their order is shuffled per epoch with a seed, so a
        # resumed run replays the same order.
        batches = shard.iter_batches(batch_size=1, batch_format="numpy",
                                     local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                     local_shuffle_seed=cfg["seed"] + epoch)
        group = []
        for i, batch in enumerate(batches):
            if i < skip:  # resuming mid-epoch: the same seed replays the same order; skip what was done
                continue
            if i >= cfg["steps_per_epoch"]:
                break
            pos = batch["position_ids"][0] if "position_ids" in batch else None
            group.append(tuple(t.to(device) for t in collate(batch["input_ids"][0], batch["labels"][0], cfg["pad_id"], pos)))
            if len(group) < accum and i + 1 < cfg["steps_per_epoch"]:
                continue
            t0 = time.time()
            loss_val, n_local = accumulation_step(model, group, autocast, world)
            group = []
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tok = torch.tensor([n_local], device=device)
            if world > 1:
                dist.all_reduce(n_tok)
            tokens_seen += int(n_tok)
            if step == start_step + 1:  # warm-up (allocator, data pipeline start) is reported apart
                first_step_s, t_steady, tokens_at_steady = time.time() - t_start, time.time(), tokens_seen
            dt = time.time() - t0
            if rank == 0:
                elapsed = time.time() - t_start
                eta = elapsed / max(1, step - start_step) * (total - step)
                print(f"[train] step {step}/{total} epoch {epoch + 1}/{cfg['epochs']} loss {loss_val:.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {int(n_tok) / dt:.0f} tok/s eta {eta:.0f}s", flush=True)
                if mlflow_client:
                    import mlflow.entities as me

                    ts = int(time.time() * 1000)
                    mlflow_client.log_batch(cfg["mlflow_run_id"], metrics=[
                        me.Metric("loss", loss_val, ts, step), me.Metric("tokens_per_s", int(n_tok) / dt, ts, step),
                        me.Metric("grad_norm", float(gnorm), ts, step), me.Metric("lr", sched.get_last_lr()[0], ts, step)])
            if step % cfg["checkpoint_every"] == 0 and step < total:
                save(i + 1, {"step": step, "loss": loss_val})
            if cfg.get("fail_at_step") == step and rank == 0 and not ckpt:
                # Test hook: this worker process dies mid-run and Ray Train must resume the group. The
                # controller collects reported checkpoints on its health check (every 2 s); dying
                # within that window would lose the last one, so wait past it first.
                time.sleep(5)
                os._exit(1)
        skip = 0
        epoch += 1
    seconds = time.time() - t_start
    steady = time.time() - t_steady
    # tokens_per_s: steady state, after the first optimizer step (when there is more than one);
    # first_step_s and train_seconds tell the whole story.
    tps = (tokens_seen - tokens_at_steady) / steady if step - start_step > 1 and steady > 0 else tokens_seen / max(seconds, 1e-9)
    save(0, {"step": step, "loss": loss_val, "epoch": epoch, "train_seconds": seconds, "first_step_s": first_step_s,
             "tokens_per_s": tps, "tokens": tokens_seen}, final=True)


def export_model(state_dict: dict, cfg: dict, out: Path) -> None:
    """Write the trained weights as a Hugging Face folder (safetensors, tokenizer, chat template).

    LoRA runs export either merged into the base weights (a plain folder any server loads) or as the
    adapter alone (small; `memo.models.load_model` merges it onto its base at load time).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg["base_path"], dtype=torch.float32, local_files_only=True)
    if cfg.get("finetune") == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
        model.load_state_dict(state_dict)
        if cfg.get("lora_export") == "merged":
            model = model.merge_and_unload()
    else:
        model.load_state_dict(state_dict)
    model.to(getattr(torch, cfg["export_dtype"]))
    model.config.use_cache = True
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(cfg["base_path"], local_files_only=True).save_pretrained(out)


# ---------------------------------------------------------------------------------------------------
# Inference, shared by the Serve deployment, the executive's in-process memory and the checks.

def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int = 64,
             temperature: float = 0.0) -> list[str]:
    """Batched generation for chat conversations (left padding); greedy unless temperature > 0."""
    import torch

    prompts = [prompt_ids(tok, msgs) for msgs in conversations]
    n = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id, **kwargs)
    return [tok.decode(o[n:], skip_special_tokens=True).strip() for o in out]


def trim_repetition(text: str) -> str:
    """Cut a small model's degenerate loop ("Wenna Ostrocliff.Wenna Ostrocliff.Wenna Ostr"): keep each
    sentence once, in order, and drop a trailing fragment that only restarts an earlier sentence."""
    import re

    parts = [p for p in re.split(r"(?<=[.!?])(?=\s|$|[A-Z])", text) if p.strip()]  # "4.4.2" is one token
    kept: list[str] = []
    for p in parts:
        if p.strip() not in (k.strip() for k in kept):
            kept.append(p)
    if len(kept) > 1 and not re.search(r"[.!?]\s*$", kept[-1]) and any(
            k.strip().startswith(kept[-1].strip()) for k in kept[:-1]):
        kept.pop()
    return "".join(kept).strip() if len(kept) < len(parts) else text


def ask_memory(model, tok, questions: list[str], max_new_tokens: int = 64, batch_size: int = 16,
               temperature: float = 0.0) -> list[str]:
    """One fresh single-turn chat per question, in the exact training format, `batch_size` at a time."""
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        out += generate(model, tok, [memory_messages(q) for q in questions[i:i + batch_size]], max_new_tokens,
                        temperature)
    return [trim_repetition(a) for a in out]


def read_manifest(model_dir: str | Path) -> dict:
    p = Path(model_dir) / "memo_manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}




def count_params(base_path: str) -> int:
    """Parameter count without loading weights (meta device), to pick defaults before any worker starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path, local_files_only=True))
    return sum(p.numel() for p in m.parameters())


def train(cfg, progress=print) -> dict:
    """The train stage: reflections -> Ray Train SFT -> HF folder with lineage -> registered version.

    Everything that can be wrong with the input is checked before a worker starts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from memo import registry
    from memo.config import memo_home
    from memo.models import resolve_base_model
    from memo.reflections import dataset_hash, load_reflections

    t0 = time.time()
    df = load_reflections(cfg.reflections)
    new_rows = len(df)
    sources = [str(Path(cfg.reflections).resolve())]
    parent_version, base_model, replay = None, cfg.base_model, 0
    if cfg.parent:
        # Continual update: the current version (e.g. champion) is the base, and a replay share of the
        # reflections it was trained on keeps old facts from being overwritten by the new ones.
        parent_version = cfg.parent if cfg.parent.isdigit() else registry.resolve_version(cfg.domain, cfg.parent)
        parent_dir = registry.download_version(cfg.domain, parent_version)
        base_path = str(materialize_full_model(parent_dir))
        base_model = f"models:/{registry.registered_name(cfg.domain)}/{parent_version}"
        held = parent_dir / "heldout.jsonl"
        exclude = {json.loads(x)["question"] for x in held.read_text().splitlines()} if held.exists() else set()
        df, replay, old_sources = with_replay(df, read_manifest(parent_dir), cfg.replay_ratio, cfg.seed, progress,
                                              exclude)
        sources += [s for s in old_sources if s not in sources]
        progress(f"[train] continual update of {base_model} ({cfg.parent}): {new_rows} new reflections "
                 f"+ {replay} replayed")
    else:
        base_path = resolve_base_model(cfg.base_model)
    data_hash, data_rows = dataset_hash(df), len(df)  # the input dataset, as the synthesize stage hashed it
    dataset_df = df
    df, heldout = split_heldout(df, cfg.holdout_ratio, cfg.seed)
    tok = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    check_chat_template(tok, f"--base-model {cfg.base_model}")
    data, dropped = tokenize_reflections(df, tok, cfg.max_seq_len)
    if data.empty:
        raise MemoError(f"--reflections {cfg.reflections}: every example is longer than max_seq_len={cfg.max_seq_len}")
    if len(data) < cfg.workers:
        raise MemoError(f"--workers {cfg.workers}: more workers than training examples ({len(data)})")
    n_params = count_params(base_path)
    epochs, lr, why = default_schedule(n_params, len(data), cfg.recipe, cfg.finetune)
    epochs, lr = cfg.epochs or epochs, cfg.lr or lr
    rows_per_batch = cfg.batch_size
    if cfg.packing:
        # About batch_size examples per micro-batch either way, so packing changes throughput, not the
        # optimisation: fewer, fuller rows instead of many padded short ones.
        n_examples = len(data)
        data = pack_examples(data, cfg.max_seq_len)
        rows_per_batch = max(1, round(cfg.batch_size * len(data) / n_examples))
        if len(data) < cfg.workers:
            raise MemoError(f"packing=true leaves {len(data)} row(s) for {cfg.workers} workers; turn packing off")
        progress(f"[train] packing: {n_examples} examples in {len(data)} rows of <= {cfg.max_seq_len} tokens, "
                 f"{rows_per_batch} rows per micro-batch")
    batches = length_grouped_batches(data, rows_per_batch, cfg.workers)
    spe = len(batches) // cfg.workers  # micro-batches per worker per epoch
    accum = max(1, cfg.effective_batch_size // (cfg.batch_size * cfg.workers)) if cfg.effective_batch_size else 1
    opt_steps_per_epoch = math.ceil(spe / accum)
    total = opt_steps_per_epoch * epochs
    precision = resolve_precision(cfg.precision, cfg.device)
    export_dtype = cfg.export_dtype if cfg.export_dtype != "auto" else ("bfloat16" if precision == "bf16" else "float32")
    stats_file = Path(cfg.reflections) / "stats.json" if Path(cfg.reflections).is_dir() else None
    synth = json.loads(stats_file.read_text()) if stats_file and stats_file.exists() else {}
    progress(f"[train] {len(data)} examples ({dropped} over {cfg.max_seq_len} tokens dropped, "
             f"{len(heldout)} paraphrases held out for evaluation), "
             f"{n_params / 1e6:.1f}M params, {cfg.finetune}, {cfg.workers} worker(s), {epochs} epochs x "
             f"{opt_steps_per_epoch} steps = {total} steps of {cfg.batch_size * cfg.workers * accum} examples"
             f"{f' ({accum} accumulated micro-batches)' if accum > 1 else ''}, lr {lr:g}, {precision}"
             + ("" if cfg.epochs and cfg.lr else f" ({why})"))

    params = {**vars(cfg), "epochs": epochs, "lr": lr, "precision": precision, "base_path": base_path,
              "examples": len(data), "dropped_too_long": dropped, "total_steps": total, "n_params": n_params,
              "accumulation": accum, "export_dtype": export_dtype, "replay_rows": replay}
    run_id = registry.start_run(cfg.domain, "train", params)
    registry.log_reflections_input(run_id, dataset_df, cfg.reflections, data_hash, cfg.domain, synth)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = cfg.cpus_per_worker or max(1, cpus // cfg.workers)
    loop_cfg = {
        "base_path": base_path, "lr": lr, "epochs": epochs, "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "precision": precision,
        "warmup_steps": int(cfg.warmup_ratio * total), "steps_per_epoch": spe, "total_steps": total,
        "accum": accum, "finetune": cfg.finetune, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha or 2 * cfg.lora_r,
        "lora_dropout": cfg.lora_dropout, "lora_export": cfg.lora_export,
        "activation_checkpointing": cfg.activation_checkpointing,
        # A full checkpoint of a 135M model with AdamW state is ~1.6 GB written twice (worker, then
        # storage): ~15 s on this CPU, so by default only ~3 per run, at epoch boundaries.
        "checkpoint_every": cfg.checkpoint_every or opt_steps_per_epoch * max(1, math.ceil(epochs / 3)),
        "seed": cfg.seed, "threads": threads, "device": cfg.device,
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "export_dtype": export_dtype, "shuffle_buffer": len(batches),
        "mlflow_run_id": run_id, "tracking_uri": registry.tracking_uri(),
        "fail_at_step": int(os.environ.get("MEMO_TEST_FAIL_AT_STEP", 0)) or None,
    }
    storage = memo_home() / "ray_results"
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg,
        # 1 logical CPU per worker leaves room for Ray Data's streaming split; the worker itself runs
        # `threads` torch threads (Ray Train would otherwise pin it to 1).
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.device == "cuda",
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"memo-{cfg.domain}-{run_id[:8]}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ray.data.from_pandas(batches)},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    out = memo_home() / "memories" / cfg.domain / run_id
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(Path(d) / "model", out)
    if (out / "adapter_config.json").exists():
        # The adapter's base must resolve wherever the version is served, not only on this machine:
        # the base model spec for a fresh run, the parent's registry URI for a continual update.
        ac = json.loads((out / "adapter_config.json").read_text())
        ac["base_model_name_or_path"] = base_model
        (out / "adapter_config.json").write_text(json.dumps(ac, indent=2))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    train_seconds = time.time() - t0
    progress(f"[train] trained in {metrics.get('train_seconds', 0):.0f} s "
             f"({metrics.get('tokens_per_s', 0):.0f} tok/s), final loss {metrics.get('loss', float('nan')):.4f}")

    check = memorization_check(out, df, cfg.eval_sample, progress)
    if len(heldout):
        rows = heldout[["question", "answer"]].to_dict("records")
        (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        check.update(heldout_check(out, rows, "heldout paraphrases", progress))
    if cfg.eval_questions:
        from memo.promotion import load_eval_items

        check.update(heldout_check(out, load_eval_items([cfg.eval_questions]), "questions from eval_questions",
                                   progress))
    manifest = {
        "domain": cfg.domain, "base_model": base_model, "base_path": base_path,
        "root_base_model": read_manifest(base_path).get("root_base_model", cfg.base_model),
        "corpus_hash": synth.get("corpus_hash", ""), "reflections": sources[0], "reflection_sources": sources,
        "reflections_hash": data_hash, "reflection_rows": data_rows, "new_rows": new_rows, "replay_rows": replay,
        "heldout_rows": len(heldout),
        "generator": synth.get("generator", ""), "finetune": cfg.finetune,
        "lora_export": cfg.lora_export if cfg.finetune == "lora" else None,
        "parent_version": parent_version, "run_id": run_id, "training_config": params, "metrics": {**metrics, **check},
    }
    (out / "memo_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    c = registry.client()
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(f"final_{k}", float(v), ts, 0) for k, v in {**metrics, **check}.items()])
    version = None
    if cfg.register:
        lineage = {k: manifest[k] for k in ("base_model", "corpus_hash", "reflections_hash", "reflection_rows",
                                            "generator", "parent_version", "finetune", "replay_rows")}
        lineage.update(train_recall=check.get("train_recall"), epochs=epochs, lr=lr)
        version = registry.register_memory(cfg.domain, out, run_id, lineage, cfg.alias)
        progress(f"[train] registered {registry.registered_name(cfg.domain)} version {version} "
                 f"with alias {cfg.alias!r}")
    c.set_terminated(run_id)
    return {"run_id": run_id, "model_dir": str(out), "version": version, "alias": cfg.alias if version else None,
            "seconds": round(train_seconds, 1), **metrics, **check}


def materialize_full_model(model_dir: Path) -> Path:
    """A full HF folder for a registered version: itself, or (adapter exports) merged onto its base once."""
    if (Path(model_dir) / "config.json").exists():
        return Path(model_dir)
    merged = Path(model_dir).with_name(Path(model_dir).name + "-merged")
    if not (merged / "config.json").exists():
        from memo.models import load_model

        model, tok = load_model(str(model_dir))
        tmp = merged.with_name(merged.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy(Path(model_dir) / "memo_manifest.json", tmp / "memo_manifest.json")
        os.replace(tmp, merged)
    return merged


def with_replay(new: pd.DataFrame, parent_manifest: dict, ratio: float, seed: int, progress=print,
                exclude: set | None = None):
    """New reflections plus a replay sample of the ones every earlier version was trained on, never
    the parent's held-out questions (the promotion gate scores on those)."""
    from memo.reflections import load_reflections

    sources = parent_manifest.get("reflection_sources") or [parent_manifest.get("reflections")]
    pools = []
    for src in filter(None, sources):
        try:
            pools.append(load_reflections(src))
        except MemoError as e:
            progress(f"[train] replay source skipped: {e}")
    n = int(round(ratio * len(new)))
    if n == 0:
        return new, 0, [s for s in sources if s]
    if not pools:
        raise MemoError(f"replay_ratio={ratio}: none of the parent's reflections are readable here "
                        f"({', '.join(filter(None, sources))}); make them available or set replay_ratio=0")
    pool = pd.concat(pools, ignore_index=True)
    pool = pool[~pool["question"].isin(exclude or set())]
    if "id" in pool.columns and "id" in new.columns:
        pool = pool[~pool["id"].isin(set(new["id"]))].drop_duplicates("id")
    replay = pool.sample(n=min(n, len(pool)), random_state=seed)
    return pd.concat([new, replay], ignore_index=True), len(replay), [s for s in sources if s]


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 after normalisation."""
    from collections import Counter

    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def split_heldout(df: pd.DataFrame, ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep some paraphrases out of training: (train, heldout).

    Only direct/indirect questions whose answer (the same fact) stays in training under another
    question are eligible, one per fact, so the held-out set measures whether the memory answers a
    reworded question about something it learned, never whether it can guess an unseen fact. The
    promotion gate and the post-training check use these questions.
    """
    n = int(round(ratio * len(df)))
    if n == 0 or "step" not in df.columns:
        return df, df.iloc[0:0]
    counts = df["answer"].value_counts()
    eligible = df[df["step"].isin(["direct", "indirect"]) & df["answer"].map(counts).gt(1)]
    eligible = eligible.sample(frac=1.0, random_state=seed).drop_duplicates("answer").head(n)
    return df.drop(index=eligible.index).reset_index(drop=True), eligible.reset_index(drop=True)


def heldout_check(model_dir: Path, rows: list[dict], label: str, progress=print) -> dict:
    """Ask questions never trained on verbatim; scored like the promotion gate (reference or alias
    contained in the reply, else token F1), plus the plain containment rate."""
    from memo.models import load_model

    scores, _ = score_items(*load_model(str(model_dir)), rows)
    hits = sum(s == 1.0 for s in scores)
    progress(f"[train] {label}: {hits}/{len(rows)} answered with the reference (score {sum(scores) / len(rows):.2f})")
    key = label.split()[0]
    return {f"{key}_contains": round(hits / len(rows), 4), f"{key}_score": round(sum(scores) / len(rows), 4),
            f"{key}_n": len(rows)}


def normalize_answer(s: str) -> str:
    """Standard QA normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def contains_reference(answer: str, refs: list[str]) -> bool:
    """A reference (or alias) appears in the answer as whole words after normalisation ("10" is not in "2010")."""
    a = f" {normalize_answer(answer)} "
    return any(normalize_answer(r) and f" {normalize_answer(r)} " in a for r in refs)


def item_score(answer: str, refs: list[str]) -> float:
    """1 when the answer contains a reference, else the best token F1 (partial credit)."""
    return 1.0 if contains_reference(answer, refs) else max(token_f1(answer, r) for r in refs)


def score_items(model, tok, items: list[dict], max_new_tokens: int = 48) -> tuple[list[float], list[str]]:
    """Ask every {question, answer, aliases?} item and score the replies: the one scoring rule of the
    post-training held-out check and the promotion gate."""
    answers = ask_memory(model, tok, [x["question"] for x in items], max_new_tokens)
    return [item_score(a, [x["answer"], *x.get("aliases", [])]) for a, x in zip(answers, items)], answers


def memorization_check(model_dir: Path, df: pd.DataFrame, sample: int, progress=print) -> dict:
    """Ask the trained memory a sample of its own reflections: exact match after normalisation."""
    if sample <= 0:
        return {}
    from memo.models import load_model

    rows = df.sample(n=min(sample, len(df)), random_state=0)
    model, tok = load_model(str(model_dir))
    max_new = min(160, max(len(tok(a)["input_ids"]) for a in rows["answer"]) + 4)
    answers = ask_memory(model, tok, list(rows["question"]), max_new_tokens=max_new)
    hits = [normalize_answer(a) == normalize_answer(ref) for a, ref in zip(answers, rows["answer"])]
    f1 = sum(token_f1(a, ref) for a, ref in zip(answers, rows["answer"])) / len(hits)
    recall = sum(hits) / len(hits)
    progress(f"[train] memorization check: {sum(hits)}/{len(hits)} sampled training reflections reproduced exactly "
             f"(normalized EM {recall:.0%}, token F1 {f1:.2f})")
    return {"train_recall": round(recall, 4), "train_f1": round(f1, 4), "train_recall_n": len(hits)}
