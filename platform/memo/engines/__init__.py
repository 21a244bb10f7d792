"""Inference engines: one interface (memo.engines.base) over transformers, llama.cpp, vLLM and any
OpenAI-compatible endpoint. `make_engine` builds one from a picklable spec, so a Ray actor or Serve
replica builds its own in its own process."""

from __future__ import annotations

from memo.engines.base import Engine, Reply


def make_engine(spec: dict, threads: int = 0) -> Engine:
    """{"kind": "hf"|"http"|"llamacpp", ...} -> an engine (imports only the backend it needs)."""
    kind = spec["kind"]
    if kind == "hf":
        from memo.engines.hf import HfEngine

        return HfEngine(spec["model"], threads, spec.get("max_prompt_tokens", 0))
    if kind == "llamacpp":
        from memo.engines.llamacpp import LlamaCppEngine
        from memo.gguf import resolve_gguf

        return LlamaCppEngine(resolve_gguf(spec["model"]), threads=threads or spec.get("threads", 1),
                              parallel=spec.get("parallel", 4), ctx_per_slot=spec.get("ctx_per_slot", 4096))
    if kind == "http":
        from memo.engines.http import HttpEngine

        return HttpEngine(spec["base_url"], spec["model"], spec.get("api_key", ""), spec.get("concurrency", 8),
                          spec.get("timeout", 120.0), spec.get("retries", 3))
    raise ValueError(f"unknown engine kind {kind!r}")


__all__ = ["Engine", "Reply", "make_engine"]
