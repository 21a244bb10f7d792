"""The one engine interface every role generates text through (memory, executive, generator, judge,
post-training checks), whatever the backend: transformers, llama.cpp, vLLM or an OpenAI-compatible URL.

  chat(batch of conversations, max_tokens, temperature, json_mode) -> [Reply]   the model's chat template;
      json_mode asks the engine to constrain decoding to a JSON object where it can (llama.cpp grammar,
      an endpoint's response_format); transformers generates unconstrained and callers still repair
  complete(batch of token-id prompts, max_tokens, temperature) -> [Reply]   exact tokens in, text out

`complete` is how a memory is asked: its own HF tokenizer renders the training prompt format and the ids
go to the backend unchanged, so every backend sees exactly the tokens training used (train as you
serve). A failed request never raises: it comes back as a Reply with `error` set, and the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Reply:
    text: str = ""
    error: str = ""                 # engine_error / too_long / timeout ...: the caller rejects the row with it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish: str = "stop"            # stop (end of turn) or length (max_tokens cut the reply)
    # Engine-side timings where the backend reports them (llama.cpp): prompt tokens actually evaluated
    # (a cached prefix is not), and seconds spent on prefill and on decode, for tokens/s per phase.
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # > 0 when the failure is transient (an engine process being restarted): ask again after this many s
    retry_after: float = 0.0
    # How sure the model was of this reply: the geometric mean of its tokens' probabilities, from the
    # engine's log-probabilities (llama.cpp, transformers); None where the backend reports none.
    confidence: float | None = None


def confidence(logprobs: list[float]) -> float | None:
    """The geometric mean token probability of a reply, exp(mean log-probability); None for no tokens."""
    import math

    return round(math.exp(sum(logprobs) / len(logprobs)), 4) if logprobs else None


class Engine(Protocol):
    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float,
             json_mode: bool = False) -> list[Reply]: ...

    def complete(self, batch: list[list[int]], max_tokens: int, temperature: float) -> list[Reply]: ...
