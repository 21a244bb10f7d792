"""Chat engines behind one `chat(batch) -> replies` interface, so a caller never knows which it talks to.

  http  any OpenAI-compatible endpoint (a hosted API, vLLM, this project's own router): up to
        `concurrency` requests in flight; the openai SDK retries connection errors, timeouts, 408/409,
        429 and 5xx with exponential backoff and honours `Retry-After`; other 4xx are not retried
  hf    a local transformers chat model; a batch is generated together (left padding)

A failed request never raises: it comes back as a Reply with `error` set, and the caller decides.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class Reply:
    text: str = ""
    error: str = ""                 # engine_error / too_long / timeout ...: the caller rejects the row with it
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HttpEngine:
    def __init__(self, base_url: str, model: str, api_key: str = "", concurrency: int = 8, timeout: float = 120.0,
                 retries: int = 3):
        import openai

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=retries)
        self.model, self.retries = model, retries
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, messages: list[dict], max_tokens: int, temperature: float) -> Reply:
        o = self._openai
        try:
            r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature)
        except (o.APIConnectionError, o.RateLimitError, o.InternalServerError) as e:  # retried already
            return Reply(error=f"engine_error: {type(e).__name__} after {self.retries + 1} attempt(s)")
        except o.APIStatusError as e:  # 400/401/404/413...: the same request would fail again
            if e.status_code == 400 and "context" in str(e).lower():
                return Reply(error="too_long: the endpoint refused the prompt's length")
            return Reply(error=f"engine_error: HTTP {e.status_code}: {str(e)[:160]}")
        u = r.usage
        return Reply((r.choices[0].message.content or "").strip(), "",
                     getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0)

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float) -> list[Reply]:
        return list(self.pool.map(lambda m: self._one(m, max_tokens, temperature), batch))


class HfEngine:
    def __init__(self, model: str, threads: int = 0, max_prompt_tokens: int = 0):
        import torch

        from memo.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_model(model)
        limit = getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float) -> list[Reply]:
        from memo.inference import generate, prompt_ids

        lens = [len(prompt_ids(self.tok, m)) for m in batch]
        ok = [i for i, n in enumerate(lens) if n + max_tokens <= self.max_prompt_tokens]
        replies = [Reply(error=f"too_long: {n} prompt tokens + {max_tokens} > the model's "
                               f"{self.max_prompt_tokens}") for n in lens]
        # Similar lengths together: left padding a short prompt to a long one costs compute for nothing.
        ok.sort(key=lambda i: lens[i])
        for j in range(0, len(ok), 8):
            idx = ok[j:j + 8]
            try:
                outs = generate(self.model, self.tok, [batch[i] for i in idx], max_tokens, temperature)
            except Exception as e:  # noqa: BLE001 - one bad batch is rejected, the job goes on
                for i in idx:
                    replies[i] = Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
                continue
            for i, text in zip(idx, outs):
                replies[i] = Reply(text, "", lens[i], len(self.tok(text, add_special_tokens=False)["input_ids"]))
        return replies


def make_engine(spec: dict, threads: int = 0):
    """An engine from a picklable spec ({"kind": "hf"|"http", ...}): what a Ray actor builds in its process."""
    if spec["kind"] == "hf":
        return HfEngine(spec["model"], threads, spec.get("max_prompt_tokens", 0))
    return HttpEngine(spec["base_url"], spec["model"], spec.get("api_key", ""), spec.get("concurrency", 8),
                      spec.get("timeout", 120.0), spec.get("retries", 3))
