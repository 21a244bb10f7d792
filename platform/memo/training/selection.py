"""Train until the facts are stored: choose the epoch on held-out rewordings (`train.select_on`).

A memory's loss on its own reflections keeps falling long after it stops getting better at questions
worded another way (it recites more and generalizes no further, or worse), so the epoch to keep is
chosen by asking rewordings it never trained on. The selection set is its own split, one question per
fact whose other wordings stay in training (the same rule as the gate's held-out set, which stays apart
so that the number the gate reads is not the one the epoch was chosen on).

Asked inside the Ray Train worker loop, between epochs: every rank generates its share of the questions
(an FSDP-sharded model needs every rank in each forward pass, so the shares are padded to one length and
generation runs with `synced_gpus`), and the hits are summed over ranks.
"""

from __future__ import annotations

import math

from memo.inference import generate_ids, memory_messages, prompt_ids, trim_repetition
from memo.text import item_score


def selection_recall(model, tok, rows: list[dict], rank: int = 0, world: int = 1, max_new_tokens: int = 32,
                     batch_size: int = 16) -> float:
    """The mean score of `rows` ({question, answer, aliases?}) asked in the training format, scored like
    the promotion gate: 1 when the greedy answer contains the reference, else its token F1. The partial
    credit matters here: on a few questions, a share of exact hits is 0 for several epochs in a row and
    cannot tell them apart. Every rank must call it."""
    import torch
    import torch.distributed as dist

    mine = rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    # padded with repeats that are not counted, so every rank runs the same number of generate calls
    asked = mine + [rows[0]] * (per_rank - len(mine))
    was_training = model.training
    model.eval()
    total_score = 0.0
    try:
        for i in range(0, per_rank, batch_size):
            chunk = asked[i:i + batch_size]
            outs = generate_ids(model, tok, [prompt_ids(tok, memory_messages(r["question"])) for r in chunk],
                                max_new_tokens, synced_gpus=world > 1, use_cache=True)
            for k, ((new, _stopped), r) in enumerate(zip(outs, chunk)):
                if i + k < len(mine):
                    text = trim_repetition(tok.decode(new, skip_special_tokens=True).strip())
                    total_score += item_score(text, [r["answer"], *r.get("aliases", [])])
    finally:
        model.train(was_training)
    total = torch.tensor([total_score], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    return round(float(total) / len(rows), 6)


class EpochSelection:
    """Which epoch to keep and when to stop. The best is the highest selection score, the later epoch on a
    tie (more training stores the facts more firmly: knowledge-injection accuracy keeps rising as the loss
    on the facts approaches its minimum). Training stops once `patience` epochs have passed without a
    better score, never before `min_epochs` (the recipe's own count: choosing can extend a run or keep an
    earlier epoch's weights, never train less than the recipe for want of signal)."""

    def __init__(self, patience: int, history: list[float] | None = None, min_epochs: int = 1):
        self.patience, self.min_epochs = patience, min_epochs
        self.history: list[float] = list(history or [])

    @property
    def best_epoch(self) -> int:
        """1-based; 0 before any epoch was scored."""
        return max(range(len(self.history)), key=lambda e: (self.history[e], e)) + 1 if self.history else 0

    @property
    def best(self) -> float:
        return self.history[self.best_epoch - 1] if self.history else float("nan")

    def add(self, score: float) -> bool:
        """Record an epoch's score; True when it is the best so far (keep this model)."""
        self.history.append(score)
        return self.best_epoch == len(self.history)

    @property
    def stop(self) -> bool:
        return len(self.history) >= self.min_epochs and len(self.history) - self.best_epoch >= self.patience
