"""The two sides the protocols talk to: an executive chat LLM (local transformers or any
OpenAI-compatible endpoint) and a memory (a model in this process, or the Serve router). Every client
keeps `usage` (calls, prompt and completion tokens) so every trace can report its cost."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Protocol

from memo import registry
from memo.engines.base import Reply
from memo.engines.http import JsonFormat
from memo.engines.memory import MemoryEngine
from memo.errors import MemoError, Unavailable
from memo.gguf import resolve_gguf
from memo.models import resolve_base_model
from memo.text import IDK_ANSWER, is_idk

log = logging.getLogger(__name__)


class ChatLLM(Protocol):
    """An executive: `usage` counts calls and tokens so every trace can report its cost."""
    usage: Counter

    def complete(self, messages: list[dict], max_tokens: int = 96, temperature: float = 0.0,
                 json_mode: bool = False) -> str: ...


class MemoryClient(Protocol):
    usage: Counter

    def ask(self, questions: list[str]) -> list[str]: ...


DEFAULT_EXECUTIVE = "qwen2.5-coder-1.5b"


def resolve_executive(spec: str) -> str:
    """`auto` is Qwen2.5-Coder-1.5B-Instruct on llama.cpp (make install puts both in place). Missing, it is
    an error naming the command that installs it, never a silent switch to a model that reads far worse:
    a user who wants the 135M model on transformers names it (executive_local=smollm2-135m)."""
    if spec != "auto":
        return spec
    from memo.engines.llamacpp import server_binary

    try:
        resolve_gguf(DEFAULT_EXECUTIVE)
        server_binary()
    except MemoError as e:
        raise MemoError(f"executive_local=auto needs {DEFAULT_EXECUTIVE} on llama.cpp: {e}. Or name another "
                        "local executive (executive_local=smollm2-135m runs on transformers, reads poorly) or "
                        "an endpoint (executive_url)") from None
    return DEFAULT_EXECUTIVE


class LocalLLM:
    """A chat model on this machine: a GGUF (pinned alias or file) on llama.cpp, or a transformers model
    (an HF folder or base-model alias). The default executive, generator and judge."""

    def __init__(self, spec: str, threads: int = 1, parallel: int = 2):
        spec = resolve_executive(spec)
        try:
            path = resolve_gguf(spec)
        except MemoError:
            path = None
        if path is not None:
            from memo.engines.llamacpp import LlamaCppEngine

            # One thread: Ray or torch share the cores; two spinning threads collapse decode.
            self.engine, self.name = LlamaCppEngine(path, threads=threads, parallel=parallel), spec
        else:
            from memo.engines.hf import HfEngine

            self.engine, self.name = HfEngine(spec, strict=False), spec
        self.usage: Counter = Counter()

    def reply(self, messages, max_tokens=96, temperature=0.0, json_mode=False) -> Reply:
        """One chat turn with its token counts (what a caller sharing this client counts per request)."""
        r = self.engine.chat([messages], max_tokens, temperature, json_mode=json_mode)[0]
        if r.error:
            if r.retry_after:
                raise Unavailable(f"executive {self.name}: {r.error}", r.retry_after)
            raise MemoError(f"executive {self.name}: {r.error}")
        self.usage.update(calls=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        # Engine timings (llama.cpp reports them) in milliseconds, so the Counter stays integer
        self.usage.update(prefill_tokens=r.prefill_tokens, prefill_ms=round(r.prefill_s * 1000),
                          decode_ms=round(r.decode_s * 1000))
        return r

    def complete(self, messages, max_tokens=96, temperature=0.0, json_mode=False) -> str:
        return self.reply(messages, max_tokens, temperature, json_mode).text


class OpenAILLM:
    """Any OpenAI-compatible endpoint (vLLM, a hosted API, or this project's own router)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        from openai import OpenAI

        # httpx logs every request at INFO, and Ray Serve's start-up resets logger levels: set it here.
        logging.getLogger("httpx").setLevel(logging.WARNING)

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model = model
        self.json_format = JsonFormat()
        self.last_version: str | None = None
        self.last_abstain_threshold: float | None = None
        self.usage: Counter = Counter()

    def reply(self, messages, max_tokens=96, temperature=0.0, json_mode=False) -> Reply:
        raw = self.json_format.create(self.client.chat.completions.with_raw_response.create, json_mode,
                                      model=self.model, messages=messages, max_tokens=max_tokens,
                                      temperature=temperature)
        self.last_version = raw.headers.get("x-memo-model-version")
        resp = raw.parse()
        u = getattr(resp, "usage", None)
        # this project's router adds memo_confidence / memo_abstain_threshold to a memory's raw answer
        extra = getattr(resp, "model_extra", None) or {}
        self.last_abstain_threshold = extra.get("memo_abstain_threshold")
        r = Reply((resp.choices[0].message.content or "").strip(), "", getattr(u, "prompt_tokens", 0) or 0,
                  getattr(u, "completion_tokens", 0) or 0,
                  "length" if resp.choices[0].finish_reason == "length" else "stop",
                  confidence=extra.get("memo_confidence"))
        self.usage.update(calls=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        return r

    def complete(self, messages, max_tokens=96, temperature=0.0, json_mode=False) -> str:
        return self.reply(messages, max_tokens, temperature, json_mode).text


class HttpMemory:
    """The memory behind the Serve router: one fresh single-turn chat per question."""

    def __init__(self, base_url: str, domain: str, api_key: str | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, confidence_gate: bool = False):
        self.llm = OpenAILLM(base_url.rstrip("/") + "/v1", domain, api_key)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.confidence_gate = confidence_gate

    @property
    def version(self) -> str | None:
        return self.llm.last_version

    @property
    def usage(self) -> Counter:
        return self.llm.usage

    def ask_detailed(self, questions) -> list[dict]:
        """Each answer with the confidence the router reports; gated by the served version's threshold."""
        rows = []
        for q in questions:
            r = self.llm.reply([{"role": "user", "content": q}], self.max_tokens, self.temperature)
            rows.append(gated(r.text, r.confidence, self.llm.last_abstain_threshold if self.confidence_gate else None))
        return rows

    def ask(self, questions):
        return [r["answer"] for r in self.ask_detailed(questions)]


def load_memory(spec: str, max_tokens: int = 64, temperature: float = 0.0,
                confidence_gate: bool = False) -> "LocalMemory":
    """A memory in this process from models:/memo-X@alias, models:/memo-X/N, a model folder or a base
    model alias (smollm2-135m); its `version` says which one answered."""
    if spec.startswith("models:/"):
        domain, alias, version = registry.parse_model_uri(spec)
        version = version or registry.resolve_version(domain, alias)
        mem = LocalMemory(str(registry.download_version(domain, version)), max_tokens, temperature,
                          confidence_gate=confidence_gate)
        mem.version = f"models:/{registry.registered_name(domain)}/{version}"
        return mem
    if not Path(spec).is_dir():
        try:
            spec = resolve_base_model(spec)
        except MemoError:
            raise MemoError(f"--memory {spec}: not a models:/ URI, a model folder or a known base model") from None
    mem = LocalMemory(spec, max_tokens, temperature, confidence_gate=confidence_gate)
    mem.version = spec
    return mem


class LocalMemory:
    """A memory model folder asked on this machine (offline evaluation, `memo ask` without a router), on
    the engine `engine` names (auto: llama.cpp when the version has a GGUF and llama-server is installed)."""

    def __init__(self, path: str, max_tokens: int = 64, temperature: float = 0.0, engine: str = "auto",
                 confidence_gate: bool = False):
        self.memory = MemoryEngine(path, engine)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.version = None
        self.usage: Counter = Counter()
        # The version's calibrated abstention threshold (training.calibration); applied when gated.
        self.abstain_threshold = self.memory.abstain_threshold
        self.confidence_gate = confidence_gate

    def ask_detailed(self, questions) -> list[dict]:
        """Each answer with its confidence; below the version's threshold (when gated) the answer is
        "I don't know." and `raw_answer` keeps what the memory said."""
        replies = self.memory.ask(questions, self.max_tokens, self.temperature)
        self.usage.update(calls=len(questions), prompt_tokens=sum(r.prompt_tokens for r in replies),
                          completion_tokens=sum(r.completion_tokens for r in replies))
        t = self.abstain_threshold if self.confidence_gate else None
        return [gated(r.text, r.confidence, t) for r in replies]

    def ask(self, questions):
        return [r["answer"] for r in self.ask_detailed(questions)]


def gated(text: str, confidence: float | None, threshold: float | None) -> dict:
    """A memory answer as the executive reads it: "I don't know." when its confidence is below the
    threshold (the raw answer kept beside it for the trace)."""
    if threshold and confidence is not None and confidence < threshold and not is_idk(text):
        return {"answer": IDK_ANSWER, "raw_answer": text, "confidence": confidence, "below_threshold": threshold}
    return {"answer": text, "confidence": confidence}


def make_executive(url: str | None, model: str | None, api_key: str | None, local: str, parallel: int = 2) -> ChatLLM:
    if url:
        if not model:
            raise MemoError("--executive-model is required with --executive-url (the model name the endpoint serves)")
        return OpenAILLM(url, model, api_key)
    return LocalLLM(local, parallel=parallel)
