"""Training throughput: `memo train` (Ray Train) against a plain PyTorch loop, 2 workers against 1,
and achieved FLOP/s against this machine's own matmul peak (an MFU figure).

All runs use the same model, the same micro-batches (`epoch_batches`, the same code as
`memo train`), the same precision and AdamW settings, and count throughput the same way: tokens
processed (prompt + answer, no padding) per second of the optimizer loop in steady state, i.e. after
the first optimizer step; the first step's time (allocator warm-up; for `memo train` also the Ray
Data pipeline start) is printed apart.

    python benchmarks/bench_training.py                      # SmolLM2-135M on the demo reflections, CPU
    python benchmarks/bench_training.py --rows 32 --quick    # smaller, for a smoke run
    python benchmarks/bench_training.py --device cuda --random-init   # on a GPU box (no weights needed)

Last line: RESULT {"tokens_per_s", "plain_tokens_per_s", "ratio_vs_plain", "scaling_2_vs_1", "mfu", "device"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name(0)}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"cpu: {model}, {os.cpu_count()} cores"


def matmul_peak(device: str, dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul in the training dtype: the ceiling the model's matmuls approach."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def plain_loop(base_path: str, batches, lr: float, precision: str, device: str, pad_id: int) -> dict:
    """The baseline: one process, all cores, no Ray, the same micro-batches and loss as `memo train`."""
    import torch
    from memo.training.data import collate
    from memo.training.loss import accumulation_step
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, local_files_only=True).to(device)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    tokens, t0, first = 0, time.time(), None
    for ids, labels in zip(batches["input_ids"], batches["labels"]):
        mb = tuple(t.to(device) for t in collate(ids, labels, pad_id))
        _, n = accumulation_step(model, [mb], precision == "bf16")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
        if first is None:  # the same steady-state rule as memo train: the first step is warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            first = (time.time() - t0, time.time(), tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    first_s, t_steady, tok0 = first
    return {"tokens": tokens, "seconds": seconds, "first_step_s": first_s,
            "tokens_per_s": (tokens - tok0) / (time.time() - t_steady)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-model", default="smollm2-135m")
    ap.add_argument("--reflections", help="reflections folder (default: synthesize the demo corpus)")
    ap.add_argument("--rows", type=int, default=64, help="training examples per run (one epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--random-init", action="store_true", help="random weights from the base model's config")
    ap.add_argument("--quick", action="store_true", help="skip the 2-worker run")
    args = ap.parse_args()

    os.environ.setdefault("MEMO_HOME", tempfile.mkdtemp(prefix="memo-bench-"))
    sys.path.insert(0, str(REPO / "platform"))
    import torch
    from memo.config import SynthesizeConfig, TrainConfig, build_config
    from memo.models import resolve_base_model
    from memo.runtime import init_ray, quiet
    from memo.synthesis import load_reflections, synthesize
    from memo.training import train
    from memo.training.data import epoch_batches, tokenize_reflections
    from memo.training.recipe import resolve_precision
    from memo.training.stage import count_params
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet()
    init_ray()
    base_path = resolve_base_model(args.base_model)
    if args.random_init:  # weights cannot travel to a lent GPU box; the config and tokenizer are enough
        path = Path(os.environ["MEMO_HOME"]) / "random-init"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path)).save_pretrained(path)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(path)
        base_path = str(path)
    refl = args.reflections
    if not refl:
        refl = str(Path(os.environ["MEMO_HOME"]) / "bench-reflections")
        synthesize(build_config(SynthesizeConfig, {"domain": "bench", "corpus": str(REPO / "examples/demo/corpus.jsonl"),
                                                   "out": refl}))
    df = load_reflections(refl).sample(frac=1.0, random_state=0).head(args.rows)
    subset = Path(os.environ["MEMO_HOME"]) / "bench-subset"
    subset.mkdir(parents=True, exist_ok=True)
    df.to_parquet(subset / "reflections.parquet")
    precision = resolve_precision("auto", args.device)
    tok = AutoTokenizer.from_pretrained(base_path)
    data, _ = tokenize_reflections(df, tok, 256)
    order = epoch_batches(list(map(len, data.input_ids)), list(data.facts), args.batch_size, seed=0)
    batches = {c: [[data[c][j] for j in b] for b in order] for c in ('input_ids', 'labels')}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_params = count_params(base_path)
    lr = 3e-4

    print(f"[bench] {device_name(args.device)}; {n_params / 1e6:.1f}M params, {len(data)} examples in "
          f"{len(order)} micro-batches of <= {args.batch_size}, {precision}", flush=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(args.device, dtype)
    print(f"[bench] matmul peak ({precision}): {peak / 1e9:.1f} GFLOP/s", flush=True)
    plain = plain_loop(base_path, batches, lr, precision, args.device, pad_id)
    print(f"[bench] plain loop: {plain['tokens_per_s']:.1f} tok/s, {plain['seconds']:.1f} s "
          f"(first step {plain['first_step_s']:.1f} s)", flush=True)

    def memo_run(workers: int, packing: bool = False) -> dict:
        cfg = build_config(TrainConfig, {"domain": "bench", "reflections": str(subset), "base_model": base_path,
                                         "workers": workers, "epochs": 1, "lr": lr, "batch_size": args.batch_size,
                                         "device": args.device, "eval_sample": 0, "register": False, "holdout_ratio": 0.0,
                                         "checkpoint_every": 10**6, "packing": packing})
        r = train(cfg)
        print(f"[bench] memo train, {workers} worker(s){', packed' if packing else ''}: "
              f"{r['tokens_per_s']:.1f} tok/s, {r['train_seconds']:.1f} s (first step {r['first_step_s']:.1f} s)",
              flush=True)
        return r

    one = memo_run(1)
    two = None if args.quick else memo_run(2)
    packed = None if args.quick else memo_run(1, packing=True)
    achieved = 6 * n_params * one["tokens_per_s"]
    result = {
        "tokens_per_s": round(one["tokens_per_s"], 2),
        "plain_tokens_per_s": round(plain["tokens_per_s"], 2),
        "ratio_vs_plain": round(one["tokens_per_s"] / plain["tokens_per_s"], 3),
        "scaling_2_vs_1": round(two["tokens_per_s"] / one["tokens_per_s"], 3) if two else None,
        "mfu": round(achieved / peak, 4),
        "device": device_name(args.device),
        # packing changes how many padded tokens are processed, so compare wall time per epoch, not tok/s
        "packing_speedup": round(one["train_seconds"] / packed["train_seconds"], 3) if packed else None,
    }
    rows = [("plain PyTorch loop (1 process)", plain["tokens_per_s"], f"baseline; first step {plain['first_step_s']:.1f} s"),
            ("memo train, 1 Ray Train worker", one["tokens_per_s"],
             f"{result['ratio_vs_plain']:.2f}x plain; first step {one['first_step_s']:.1f} s"),
            ("memo train, 2 workers (FSDP2)", two["tokens_per_s"] if two else float("nan"),
             f"{result['scaling_2_vs_1']:.2f}x 1 worker" if two else "skipped"),
            ("memo train, 1 worker, packed rows", packed["tokens_per_s"] if packed else float("nan"),
             f"epoch in {result['packing_speedup']:.2f}x less time" if packed else "skipped")]
    print(f"\n{'run':<34} {'tok/s':>9}  vs")
    for name, tps, vs in rows:
        print(f"{name:<34} {tps:>9.1f}  {vs}")
    print(f"{'achieved FLOP/s (6 N tokens/s)':<34} {achieved / 1e9:>9.1f}G  MFU {result['mfu']:.1%} of "
          f"{peak / 1e9:.1f} GFLOP/s matmul peak")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
