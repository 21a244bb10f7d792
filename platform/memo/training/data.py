"""SFT data for the memory: reflections -> token ids with answer-only labels, length-grouped
micro-batches, sequence packing, the held-out paraphrases, and replay for continual updates."""

from __future__ import annotations

import logging

import pandas as pd

from memo.errors import MemoError
from memo.inference import memory_messages, prompt_ids
from memo.synthesis.schema import load_reflections

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


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
    a wrong fact) and counted. `facts` holds each example's fact key (see `epoch_batches`)."""
    ids, labels = [], []
    for q, a in zip(df["question"], df["answer"]):
        i, l = encode_example(tok, q, a)
        ids.append(i)
        labels.append(l)
    out = pd.DataFrame({"input_ids": ids, "labels": labels, "facts": [[fact_key(a)] for a in df["answer"]]})
    keep = out["input_ids"].map(len) <= max_seq_len
    return out[keep].reset_index(drop=True), int((~keep).sum())


def fact_key(answer: str) -> str:
    """Which fact a reflection teaches: rows with the same answer (the rules generator's corpus
    sentence, an LLM generator's short answer) are wordings of one fact."""
    return " ".join(str(answer).lower().split())


def deal(order: list[list[int]], step: int, per_step: int, rank: int, world: int) -> tuple[list[list[int]], int]:
    """This rank's micro-batches of optimizer step `step` of an epoch (`order` from epoch_batches), and how
    many of them count.

    The step trains micro-batches [step*per_step, (step+1)*per_step) of the epoch, dealt round-robin: the
    same examples for any number of workers, so a run resumed on another number of workers goes on with
    the same steps. Under FSDP every rank must run as many forwards (each gathers the shards): where the
    last step of an epoch leaves a rank fewer, it repeats one with weight zero (the count says so).
    """
    in_step = order[step * per_step:(step + 1) * per_step]
    mine = in_step[rank::world]
    live = len(mine)
    if world > 1:
        mine = mine + [in_step[0]] * (-(-len(in_step) // world) - live)
    return mine, live


def epoch_batches(lengths: list[int], facts: list, batch_size: int, seed: int, window: int = 16) -> list[list[int]]:
    """One epoch's micro-batches, as lists of row indices: every row exactly once, in
    ceil(len / batch_size) micro-batches of batch_size (the last one smaller).

    - The order is shuffled globally with `seed` (one seed per epoch), so a fact's wordings meet
      different neighbours every epoch (Allen-Zhu & Li: shuffling alone lifts extraction 4% -> 70%).
    - Within a window of `window` micro-batches rows are sorted by length: padding is pure waste on CPU.
    - No two wordings of one fact share a micro-batch (swapped with rows of the nearest batches) unless a
      fact has more wordings than there are batches: with all of a fact's wordings in one step the model
      reads across copies instead of storing the fact.
    `facts[i]` is the set of fact keys row i holds (a packed row holds several).
    """
    import random
    from collections import Counter

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    order = [i for w in range(0, len(order), span) for i in sorted(order[w:w + span], key=lengths.__getitem__)]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    held = [Counter(key for i in b for key in facts[i]) for b in batches]

    def fits(i: int, c: int, without: int) -> bool:  # row i's facts absent from batch c once `without` leaves it
        return all(held[c][key] - (key in facts[without]) == 0 for key in facts[i])

    # Repair by swaps with the nearest batches (similar lengths): sizes stay, padding barely grows.
    for b, batch in enumerate(batches):
        for pos in range(len(batch)):
            i = batch[pos]
            if all(held[b][key] == 1 for key in facts[i]):
                continue
            for c in sorted(range(len(batches)), key=lambda c: abs(c - b)):
                j = next((j for j in batches[c] if c != b and fits(i, c, j) and fits(j, b, i)), None)
                if j is not None:
                    batches[c][batches[c].index(j)], batch[pos] = i, j
                    held[b].subtract(facts[i]), held[b].update(facts[j])
                    held[c].subtract(facts[j]), held[c].update(facts[i])
                    break
    rng.shuffle(batches)
    return batches


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
    with position ids restarting at each example, never two wordings of one fact in a row (`facts`
    column, when there is one). Returns rows like `data` plus `position_ids`, `examples` (how many a
    row holds) and `facts` (the fact keys it holds)."""
    facts = list(data["facts"]) if "facts" in data.columns else [[str(i)] for i in range(len(data))]
    order = sorted(range(len(data)), key=lambda i: -len(data["input_ids"][i]))
    rows: list[list[int]] = []
    room: list[int] = []
    held: list[set] = []
    for i in order:
        n, keys = len(data["input_ids"][i]), set(facts[i])
        k = next((r for r, free in enumerate(room) if free >= n and not keys & held[r]), None)
        if k is None:
            rows.append([i])
            room.append(max_seq_len - n)
            held.append(set(keys))
        else:
            rows[k].append(i)
            room[k] -= n
            held[k] |= keys
    return pd.DataFrame({
        "input_ids": [[t for i in r for t in data["input_ids"][i]] for r in rows],
        "labels": [[t for i in r for t in data["labels"][i]] for r in rows],
        "position_ids": [[p for i in r for p in range(len(data["input_ids"][i]))] for r in rows],
        "examples": [len(r) for r in rows],
        "facts": [sorted(h) for h in held],
    })


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


def with_replay(new: pd.DataFrame, parent_manifest: dict, ratio: float, seed: int,
                exclude: set | None = None):
    """New reflections plus a replay sample of the ones every earlier version was trained on, never
    the parent's held-out questions (the promotion gate scores on those)."""
    sources = parent_manifest.get("reflection_sources") or [parent_manifest.get("reflections")]
    pools = []
    for src in filter(None, sources):
        try:
            pools.append(load_reflections(src))
        except MemoError as e:
            log.info(f"[train] replay source skipped: {e}")
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
