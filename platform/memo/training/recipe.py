"""Training defaults that depend on the model, the data and the hardware: epochs and learning rate
(the paper's recipe is for a 14B model), and the precision the CPU or GPU runs fastest in."""

from __future__ import annotations


def default_schedule(n_params: float, n_rows: int, recipe: str = "auto", finetune: str = "full") -> tuple[int, float, str]:
    """Epochs and learning rate when the user sets neither.

    The paper's full-SFT recipe (3 epochs, lr 2e-5; LoRA 2e-4) is for a 14B model on ~1M pairs. A ~100M
    model on a few hundred pairs barely moves at 2e-5: measured on SmolLM2-135M, 60 facts x 4 epochs
    recalled 7/60 at 2e-5 and 41/60 at 3e-4, and 12 epochs at 3e-4 recalled 59/60. The rules generator
    asks each demo fact 3-5 ways (direct, indirect, entity, consolidated, cross-document), so every fact
    is seen ~20 times in 6 epochs. LoRA moves fewer weights and takes a higher rate (10x, as in the
    paper's own full/LoRA pair); the small-model LoRA rate is that ratio applied, not a measured optimum.
    A bigger model takes a lower full-SFT rate: Qwen2.5-Coder-0.5B (630M as dequantized) at 3e-4 did not
    lower its loss through epoch 1 and spiked to ~4 on the rows where the 135M reached 1.3 and 0.5; at
    1e-4 it tracked the 135M (1.7 and 0.7 on those rows; RESULTS.md, bench_knowledge seed 1).
    """
    lora = finetune == "lora"
    if recipe == "paper" or n_params >= 1e9:
        why = "recipe=paper" if recipe == "paper" else f"a {n_params / 1e9:.1f}B model takes the paper's recipe"
        return 3, (2e-4 if lora else 2e-5), f"{why}: 3 epochs, lr " + ("2e-4 (LoRA)" if lora else "2e-5")
    if n_rows < 20_000 and n_params < 3e8:
        return 6, (1e-3 if lora else 3e-4), "small model and corpus: 6 epochs at a high rate (paper's 2e-5 x 3 barely memorizes at this size)"
    if n_rows < 20_000:
        return 6, (1e-3 if lora else 1e-4), "a sub-1B model on a small corpus: 6 epochs at lr 1e-4 (3e-4 was unstable at 630M)"
    return 4, (1e-3 if lora else 1e-4), "small model, larger corpus: 4 epochs"


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 where the hardware has bf16 matmul units, else fp32.

    Measured on 2-core CPUs: with AVX512-BF16 bf16 autocast is ~1.4x faster than fp32, but on an
    AVX2-only CPU a bf16 matmul ran at ~1 GFLOP/s against ~157 GFLOP/s in fp32 (160x slower).
    """
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16"
    from memo.runtime import cpu_flags

    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()) else "fp32"
