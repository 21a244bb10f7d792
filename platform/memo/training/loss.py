"""The SFT loss: answer tokens only, vocabulary logits only where they count, packed rows kept apart by
a block-diagonal mask, and gradient accumulation normalised by the answer tokens of the whole step."""

from __future__ import annotations

from memo.training.data import IGNORE


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


def accumulation_step(model, micro_batches: list, autocast: bool = False, world: int = 1,
                      live: int | None = None) -> tuple[float, int]:
    """Forward and backward over this worker's micro-batches of one optimizer step (gradient accumulation).

    Each micro-batch's summed loss is divided by the answer-token count of the whole step over all
    workers, so the gradient equals the one of a single big batch however the examples were split;
    data-parallel gradient averaging divides by `world`, hence the factor. With FSDP, gradients are
    reduce-scattered once, after the last micro-batch.

    Only the first `live` micro-batches count (default: all): in the last step of an epoch a worker may
    hold fewer micro-batches than another, yet every FSDP rank must run as many forwards and backwards
    (each one gathers and reduce-scatters the shards), so the others are repeated with weight zero.
    Returns (mean loss over the step's answer tokens on all workers, the tokens this worker trained on).
    """
    import torch
    import torch.distributed as dist

    live = len(micro_batches) if live is None else live
    device = micro_batches[0][0].device
    counts = torch.tensor([float(sum(target_count(mb[1]) for mb in micro_batches[:live]))], device=device)
    if world > 1:
        dist.all_reduce(counts)
    scale = world / max(float(counts[0]), 1.0)
    total, tokens = 0.0, 0
    for k, (ids, labels, mask, *pos) in enumerate(micro_batches):
        if world > 1 and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = answer_loss(model, ids, labels, mask, reduction="sum", position_ids=pos[0] if pos else None)
        (loss * (scale if k < live else 0.0)).backward()
        if k < live:
            total += float(loss.detach())
            tokens += int(mask.sum())
    summed = torch.tensor([total], device=device)
    if world > 1:  # the step's loss, the same number whatever the number of workers
        dist.all_reduce(summed)
    return float(summed[0]) / max(float(counts[0]), 1.0), tokens
