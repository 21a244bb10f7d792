"""A local transformers model: the reference engine (what the unit tests run). A batch is generated
together with left padding, similar lengths together."""

from __future__ import annotations

from memo.engines.base import Reply, confidence


class HfEngine:
    """`strict`: a prompt that does not fit the model's positions is a too_long reply (what the generator
    rejects a chunk with); otherwise it is generated anyway (RoPE models run past their nominal length)."""

    def __init__(self, model: str, threads: int = 0, max_prompt_tokens: int = 0, loaded=None, strict: bool = True):
        import torch

        from memo.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = loaded or load_model(model)
        limit = getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit) if strict else 10**9

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float,
             json_mode: bool = False) -> list[Reply]:  # no grammar here: json_mode is a hint callers repair
        from memo.inference import prompt_ids

        return self.complete([prompt_ids(self.tok, m) for m in batch], max_tokens, temperature)

    def complete(self, batch: list[list[int]], max_tokens: int, temperature: float) -> list[Reply]:
        from memo.inference import generate_ids

        lens = [len(p) for p in batch]
        ok = [i for i, n in enumerate(lens) if n + max_tokens <= self.max_prompt_tokens]
        replies = [Reply(error=f"too_long: {n} prompt tokens + {max_tokens} > the model's "
                               f"{self.max_prompt_tokens}") for n in lens]
        # Similar lengths together: left padding a short prompt to a long one costs compute for nothing.
        ok.sort(key=lambda i: lens[i])
        for j in range(0, len(ok), 16):
            idx = ok[j:j + 16]
            try:
                outs = generate_ids(self.model, self.tok, [batch[i] for i in idx], max_tokens, temperature,
                                    logprobs=True)
            except Exception as e:  # noqa: BLE001 - one bad batch is rejected, the job goes on
                for i in idx:
                    replies[i] = Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
                continue
            for i, (new, stopped, lp) in zip(idx, outs):
                replies[i] = Reply(self.tok.decode(new, skip_special_tokens=True).strip(), "", lens[i], len(new),
                                   "stop" if stopped else "length", confidence=confidence(lp))
        return replies
