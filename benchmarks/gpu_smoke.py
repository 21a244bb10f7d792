"""One-GPU smoke test of the training path, for a session lent a GPU machine: torch only (no Ray, no vLLM,
no transformers, no network), the project's loss module loaded by path, one call.

    python benchmarks/gpu_smoke.py                               # CUDA: every check, then 0.5B / 1.5B / 3B
    python benchmarks/gpu_smoke.py --device cpu --sizes tiny     # the same checks on CPU (gloo), seconds

Checks, each against a baseline computed in the same run:
1. the machine: torch, CUDA and driver versions, the GPU, bf16 support;
2. a world-size-1 process group (NCCL on CUDA, gloo on CPU) and FSDP2 `fully_shard` of every decoder layer;
3. gradient accumulation under bf16 autocast: two micro-batches of 4 give the gradient of one batch of 8
   (`memo.training.loss.accumulation_step`, the step the Ray Train loop runs);
4. the packed block-diagonal mask through SDPA: two examples packed in one row give the loss of the two
   apart (`memo.training.loss.packed_mask` / `answer_loss`);
5. a torch.distributed.checkpoint round trip of the sharded model and optimizer;
6. tokens/s, MFU and peak memory of a training step (AdamW, bf16 autocast, activation checkpointing) for
   random-initialised decoders shaped like Qwen2.5-0.5B, -1.5B and -3B, against the GPU's dense bf16 peak.
Prints a table and ends with `RESULT {json}`; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100  # memo.training.data.IGNORE
# (hidden, layers, heads, kv heads, intermediate, vocab): the shapes of the Qwen2.5 instruct models
SIZES = {"tiny": (64, 2, 4, 2, 128, 512), "0.5b": (896, 24, 14, 2, 4864, 151936),
         "1.5b": (1536, 28, 12, 2, 8960, 151936), "3b": (2048, 36, 16, 2, 11008, 151936)}
# dense bf16 tensor-core peaks (FLOP/s) by device name, for MFU
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def load_loss_module():
    """memo/training/loss.py by path; its one project import (IGNORE from memo.training.data, a module that
    needs pandas) is given as a stub, so nothing but torch is needed."""
    for name in ("memo", "memo.training"):
        sys.modules.setdefault(name, types.ModuleType(name))
    data = types.ModuleType("memo.training.data")
    data.IGNORE = IGNORE
    sys.modules["memo.training.data"] = data
    spec = importlib.util.spec_from_file_location("memo_loss", REPO / "platform" / "memo" / "training" / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Config:
    _attn_implementation = "sdpa"


class Block(nn.Module):
    def __init__(self, h, heads, kv, inter):
        super().__init__()
        self.heads, self.kv, self.dim = heads, kv, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.q, self.k, self.v = nn.Linear(h, h), nn.Linear(h, kv * self.dim), nn.Linear(h, kv * self.dim)
        self.o = nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False), \
            nn.Linear(inter, h, bias=False)

    def forward(self, x, mask, cos, sin):
        b, n, _ = x.shape
        y = self.norm1(x)
        q = self.q(y).view(b, n, self.heads, self.dim).transpose(1, 2)
        k = self.k(y).view(b, n, self.kv, self.dim).transpose(1, 2)
        v = self.v(y).view(b, n, self.kv, self.dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, n, -1))
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Decoder(nn.Module):
    """A Llama/Qwen-shaped decoder with the interface answer_loss calls (input_ids, attention_mask 2D or a
    4D boolean mask, position_ids, logits_to_keep -> .logits), random-initialised."""

    def __init__(self, size: str, checkpointing: bool = False):
        super().__init__()
        h, layers, heads, kv, inter, vocab = SIZES[size]
        self.config, self.checkpointing, self.head_dim = Config(), checkpointing, h // heads
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(Block(h, heads, kv, inter) for _ in range(layers))
        self.norm = nn.RMSNorm(h)
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None):
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        else:
            causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
            pad = attention_mask.bool()[:, None, None, :] if attention_mask is not None else True
            mask = causal[None, None] & pad
        inv = 1.0 / (1e6 ** (torch.arange(0, self.head_dim, 2, device=input_ids.device).float() / self.head_dim))
        ang = position_ids[..., None].float() * inv
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1)[:, None], torch.cat((ang.sin(), ang.sin()), -1)[:, None]
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, cos, sin, use_reentrant=False)
            else:
                x = layer(x, mask, cos, sin)
        x = self.norm(x)
        if logits_to_keep is not None:
            x = x[:, logits_to_keep]
        return types.SimpleNamespace(logits=self.lm_head(x))


def examples(vocab: int, n: int, length: int, seed: int):
    """n (ids, labels) rows: a prompt (no loss) then an answer (loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = IGNORE
        rows.append((ids, labels))
    return rows


def batch(rows, device):
    ids = torch.stack([r[0] for r in rows]).to(device)
    labels = torch.stack([r[1] for r in rows]).to(device)
    return ids, labels, torch.ones_like(ids)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def grads(model):
    return torch.cat([p.grad.full_tensor().flatten() if hasattr(p.grad, "full_tensor") else p.grad.flatten()
                      for p in model.parameters() if p.grad is not None]).float()


def check_accumulation(loss, device, autocast: bool) -> dict:
    torch.manual_seed(0)
    rows = examples(SIZES["tiny"][5], 8, 32, 1)
    out = {}
    for name, split in (("one batch of 8", [rows]), ("two micro-batches of 4", [rows[:4], rows[4:]])):
        torch.manual_seed(0)
        model = shard(Decoder("tiny").to(device))
        loss.accumulation_step(model, [batch(r, device) for r in split], autocast, 1)
        out[name] = grads(model)
    a, b = out.values()
    rel = float((a - b).norm() / a.norm())
    return {"check": "accumulation == one big batch (bf16 autocast)" if autocast else "accumulation (fp32)",
            "value": f"relative grad difference {rel:.2e}", "ok": rel < (2e-2 if autocast else 1e-5)}


def check_packed(loss, device) -> dict:
    torch.manual_seed(0)
    model = Decoder("tiny").to(device).eval()
    (a_ids, a_lab), (b_ids, b_lab) = examples(SIZES["tiny"][5], 2, 24, 2)
    with torch.no_grad():
        apart = sum(float(loss.answer_loss(model, i[None].to(device), l[None].to(device),
                                           torch.ones(1, len(i), dtype=torch.long, device=device), reduction="sum"))
                    for i, l in ((a_ids, a_lab), (b_ids, b_lab)))
        ids = torch.cat([a_ids, b_ids])[None].to(device)
        labels = torch.cat([a_lab, b_lab])[None].to(device)
        pos = torch.cat([torch.arange(len(a_ids)), torch.arange(len(b_ids))])[None].to(device)
        packed = float(loss.answer_loss(model, ids, labels, torch.ones_like(ids), reduction="sum", position_ids=pos))
        unmasked = float(loss.answer_loss(model, ids, labels, torch.ones_like(ids), reduction="sum"))
    rel = abs(packed - apart) / abs(apart)
    return {"check": "packed mask through SDPA == examples apart",
            "value": f"packed {packed:.4f}, apart {apart:.4f}, no mask {unmasked:.4f}",
            "ok": rel < 1e-4 and abs(unmasked - apart) / abs(apart) > 1e-4}


def check_checkpoint(device) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(0)
    model = shard(Decoder("tiny").to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels, mask = batch(examples(SIZES["tiny"][5], 2, 16, 3), device)
    F.cross_entropy(model(ids).logits.flatten(0, 1).float(), ids.flatten()).backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    with tempfile.TemporaryDirectory() as d:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=d)
        torch.manual_seed(1)
        other = shard(Decoder("tiny").to(device))
        other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
        F.cross_entropy(other(ids).logits.flatten(0, 1).float(), ids.flatten()).backward()
        other_opt.step()
        m2, o2 = get_state_dict(other, other_opt)
        state = {"model": m2, "optim": o2}
        dcp.load(state, checkpoint_id=d)
        set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same = all(torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                           b.full_tensor() if hasattr(b, "full_tensor") else b)
               for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    return {"check": "torch.distributed.checkpoint round trip (model + AdamW)", "value": "equal" if same else "differs",
            "ok": same}


def throughput(size: str, device, steps: int, batch_size: int, seq: int, peak: float | None) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = shard(Decoder(size, checkpointing=True).to(device))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rows = examples(SIZES[size][5], batch_size, seq, 4)
    ids, labels, mask = batch(rows, device)
    times = []
    for _ in range(steps + 1):  # the first step (allocation, kernels) is not timed
        sync(device)
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(ids).logits
        F.cross_entropy(out.flatten(0, 1).float(), ids.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.time() - t0)
    step_s = sum(times[1:]) / steps
    tps = batch_size * seq / step_s
    flops = 8 * n_params * tps  # 6 N per token, +2 N for the recomputed forward (activation checkpointing)
    res = {"size": size, "params_m": round(n_params / 1e6), "tokens_per_s": round(tps), "step_s": round(step_s, 3),
           "mfu": round(flops / peak, 3) if peak else None,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None}
    del model, opt
    return res


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
                    memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown (no nvidia-smi)"
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="0.5b,1.5b,3b", help=f"of {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    info = machine(device)
    loss = load_loss_module()
    checks = [check_accumulation(loss, device, autocast=False), check_accumulation(loss, device, autocast=True),
              check_packed(loss, device), check_checkpoint(device)]
    peak = next((v for k, v in PEAKS.items() if k in info.get("gpu", "")), None)
    runs = []
    for size in args.sizes.split(","):
        try:
            runs.append(throughput(size, device, args.steps, args.batch, args.seq if size != "tiny" else 64, peak))
        except torch.OutOfMemoryError as e:
            runs.append({"size": size, "error": f"out of memory: {str(e)[:120]}"})
    torch.distributed.destroy_process_group()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("\n| check | value | ok |\n|---|---|---|")
    for c in checks:
        print(f"| {c['check']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |")
    print(f"\n| decoder | params (M) | tokens/s | step s | MFU (vs {peak and f'{peak / 1e12:.0f} TFLOP/s'}) | peak GB |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['size']} | {r.get('params_m')} | {r.get('tokens_per_s')} | {r.get('step_s')} | {r.get('mfu')} | "
              f"{r.get('peak_mem_gb', r.get('error'))} |")
    ok = all(c["ok"] for c in checks) and not any("error" in r for r in runs)
    print("RESULT " + json.dumps({"machine": info, "checks": {c["check"]: c["ok"] for c in checks}, "runs": runs,
                                  "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
