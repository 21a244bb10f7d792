"""Any OpenAI-compatible chat endpoint (a hosted API, vLLM, this project's own router): up to
`concurrency` requests in flight; the openai SDK retries connection errors, timeouts, 408/409, 429 and
5xx with exponential backoff and honours `Retry-After`; other 4xx are not retried."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from memo.engines.base import Reply


class JsonFormat:
    """`response_format: json_object` for endpoints that take it; one that answers 400 to it is asked
    again without, and never with it again (many OpenAI-compatible servers do not implement it)."""

    def __init__(self):
        self.supported = True

    def create(self, create, json_mode: bool, **kwargs):
        import openai

        if json_mode and self.supported:
            try:
                return create(**kwargs, response_format={"type": "json_object"})
            except openai.BadRequestError as e:
                if "response_format" not in str(e) and "json" not in str(e).lower():
                    raise
                self.supported = False
        return create(**kwargs)


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
        self.json_format = JsonFormat()

    def _one(self, messages: list[dict], max_tokens: int, temperature: float, json_mode: bool) -> Reply:
        o = self._openai
        try:
            r = self.json_format.create(self.client.chat.completions.create, json_mode, model=self.model,
                                        messages=messages, max_tokens=max_tokens, temperature=temperature)
        except (o.APIConnectionError, o.RateLimitError, o.InternalServerError) as e:  # retried already
            return Reply(error=f"engine_error: {type(e).__name__} after {self.retries + 1} attempt(s)")
        except o.APIStatusError as e:  # 400/401/404/413...: the same request would fail again
            if e.status_code == 400 and "context" in str(e).lower():
                return Reply(error="too_long: the endpoint refused the prompt's length")
            return Reply(error=f"engine_error: HTTP {e.status_code}: {str(e)[:160]}")
        u = r.usage
        return Reply((r.choices[0].message.content or "").strip(), "",
                     getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0)

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float,
             json_mode: bool = False) -> list[Reply]:
        return list(self.pool.map(lambda m: self._one(m, max_tokens, temperature, json_mode), batch))
