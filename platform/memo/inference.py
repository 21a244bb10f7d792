"""Inference with a memory model, and the one prompt format it is trained and queried in.

Train as you serve: `memory_messages` is the one prompt format used by training, by the Serve
deployment and by the executive, so the model is never queried in a format it was not trained on.
"""

from __future__ import annotations

import re
from typing import Any

from memo.errors import MemoError

# Short on purpose: it is part of every training example (tokens cost CPU time) and without any system
# message SmolLM2's template injects its own ~20-token default. Abstention is taught by the `abstain`
# reflections themselves, in this same format.
MEMORY_SYSTEM_PROMPT = "Answer from memory."


def memory_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": MEMORY_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def check_chat_template(tok, where: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise MemoError(f"{where}: the tokenizer has no chat template; use an instruct/chat model "
                        "(or add a chat_template to its tokenizer_config.json)")


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def generate_ids(model, tok, prompts: list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, logprobs: bool = False, **generate_kwargs: Any) -> list[tuple]:
    """Batched generation from token ids (left padding); greedy unless temperature > 0. Returns, per
    prompt, the new tokens up to the end-of-turn token, and whether it stopped there (else max_new_tokens);
    with `logprobs`, also each of those tokens' log-probability. `generate_kwargs` go to `model.generate`
    (e.g. synced_gpus for a model sharded over ranks)."""
    import torch

    n = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (n - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, **generate_kwargs}
    if temperature > 0:
        kwargs["temperature"] = temperature
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id, output_scores=logprobs,
                             return_dict_in_generate=True, **kwargs)
        seqs = out.sequences
        lp = None
        if logprobs:  # the chosen token's log-probability at each step, (batch, steps)
            steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)
            lp = steps.gather(-1, seqs[:, n:n + steps.shape[1], None]).squeeze(-1).tolist()
    results = []
    for k, row in enumerate(seqs[:, n:].tolist()):
        stop = row.index(tok.eos_token_id) if tok.eos_token_id in row else None
        new = row[:stop] if stop is not None else row
        results.append((new, stop is not None) + ((lp[k][:len(new)],) if logprobs else ()))
    return results


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int = 64,
             temperature: float = 0.0) -> list[str]:
    """Batched generation for chat conversations, rendered with the model's own chat template."""
    outs = generate_ids(model, tok, [prompt_ids(tok, m) for m in conversations], max_new_tokens, temperature)
    return [tok.decode(new, skip_special_tokens=True).strip() for new, _stopped in outs]


def trim_repetition(text: str) -> str:
    """Cut a small model's degenerate loop ("Wenna Ostrocliff.Wenna Ostrocliff.Wenna Ostr"): keep each
    sentence once, in order, and drop a trailing fragment that only restarts an earlier sentence."""
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
