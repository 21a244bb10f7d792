"""The memory deployment: hosts memory model versions, many domains per replica (@serve.multiplexed LRU).

Concurrent questions are generated together: on llama.cpp by the server's own continuous batching
(each request goes straight to a slot), on transformers and vLLM through @serve.batch. Every version a
replica starts serving opens a span in the serving audit (memo.registry: one tag per span, so replicas
never overwrite each other); the span closes when the replica serves another version of that domain
or shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from memo import registry
from memo.config import ServeConfig
from memo.engines.memory import MemoryEngine
from memo.models import materialize_full_model
from memo.runtime import quiet
from memo.serving.replica import use_state_of

log = logging.getLogger("ray.serve")
MAX_ONGOING = 16  # requests in flight per memory replica


def load_error(model_id: str, e: Exception) -> dict:
    return {"error": f"memory {model_id} could not be loaded: {type(e).__name__}: {e}"}


class ServingAudit:
    """This replica's open serving spans, one per domain, written through memo.registry. Best effort:
    serving must not fail because the registry is busy (a failed write is logged)."""

    def __init__(self, deployment: str, replica: str):
        self.deployment, self.replica = deployment, replica
        self.open: dict[str, dict] = {}

    def serving(self, domain: str, version: str) -> None:
        current = self.open.get(domain)
        if current and current["version"] == str(version):
            return
        try:
            if current:
                registry.close_serving_span(current)
            self.open[domain] = registry.open_serving_span(domain, self.deployment, self.replica, str(version))
        except Exception as e:  # noqa: BLE001 - the audit must not take serving down
            log.warning("memo audit: could not record %s v%s on %s: %s", domain, version, self.replica, e)

    def close_all(self) -> None:
        for span in list(self.open.values()):
            try:
                registry.close_serving_span(span)
            except Exception:  # noqa: BLE001 - shutting down
                pass
        self.open.clear()


# Health: Serve calls check_health every 5 s; an engine process that died is restarted by it (and by the
# first request that finds it gone), and an engine that keeps dying fails the check, so Serve replaces the
# replica. A constructor that fails 3 times ends the deployment (serve.run reports the reason).
HEALTH = {"health_check_period_s": 5, "health_check_timeout_s": 30, "max_constructor_retry_count": 3}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING, **HEALTH)
class MemoryModel:
    def __init__(self, cfg: dict):
        quiet()
        self.cfg = ServeConfig(**cfg)
        use_state_of(self.cfg)
        ctx = serve.get_replica_context()
        self.audit = ServingAudit(ctx.deployment, ctx.replica_tag)

        # Decorated here rather than on the class because the LRU size and batch shape come from the config.
        async def load(model_id: str):
            return await self._load(model_id)

        async def generate_batch(requests: list) -> list:
            return await self._generate_batch(requests)

        self._get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
        self._batched = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                    batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(generate_batch)
        # Blocking engine calls run here, one thread per request in flight (asyncio's default pool has
        # cpu_count + 4 threads, which would cap overlap below max_ongoing_requests on a small node).
        self._pool = ThreadPoolExecutor(max_workers=MAX_ONGOING, thread_name_prefix="memory")
        # The versions this replica has loaded (the multiplexed LRU holds the only strong references).
        self._loaded: weakref.WeakSet = weakref.WeakSet()

    def check_health(self) -> None:
        """Restart any loaded engine whose process died; fail (Serve replaces the replica) when one has
        given up."""
        for memory in list(self._loaded):
            if hasattr(memory, "heal"):  # llama.cpp; transformers runs in-process, vLLM has its own checks
                memory.heal()

    async def _load(self, model_id: str):
        """One loaded version: a MemoryEngine (llama.cpp server process or transformers model) or vLLM.
        When the multiplexed LRU drops it, its engine is closed (a llama-server process stops)."""
        domain, version = model_id.split(":")
        path = await asyncio.to_thread(registry.download_version, domain, version)
        if self.cfg.engine == "vllm":
            from memo.engines.vllm import VLLMMemory

            full = await asyncio.to_thread(materialize_full_model, path)  # vLLM needs merged weights
            memory = await asyncio.to_thread(VLLMMemory, str(full), self.cfg.max_models_per_replica,
                                             self.cfg.replica_gpus, self.cfg.memory_max_model_len,
                                             self.cfg.gpu_memory_share)
        else:
            memory = await asyncio.to_thread(MemoryEngine, str(path), self.cfg.engine, self.cfg.engine_threads,
                                             self.cfg.engine_parallel)
        await asyncio.to_thread(self.audit.serving, domain, version)
        self._loaded.add(memory)
        return memory

    async def _generate(self, memory, questions: list[str], max_tokens: int, temperature: float) -> list[dict]:
        t0 = time.time()
        replies = await asyncio.get_running_loop().run_in_executor(self._pool, memory.ask, questions, max_tokens,
                                                                   temperature)
        threshold = getattr(memory, "abstain_threshold", None)
        return [{"error": f"the memory could not answer: {r.error}", "retry_after": r.retry_after} if r.error else {
            "text": r.text, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "finish": r.finish, "seconds": time.time() - t0, "batch_size": len(questions),
            "confidence": r.confidence, "abstain_threshold": threshold} for r in replies]

    async def _generate_batch(self, requests: list) -> list:
        """One batch of (model_id, question, max_tokens, temperature): one generate call per group."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, (model_id, _, max_tokens, temperature) in enumerate(requests):
            groups.setdefault((model_id, max_tokens, temperature), []).append(i)
        for (model_id, max_tokens, temperature), idx in groups.items():
            try:  # one version failing to load must not fail the other domains batched with it
                memory = await self._get_model(model_id)
            except Exception as e:
                for i in idx:
                    out[i] = load_error(model_id, e)
                continue
            replies = await self._generate(memory, [requests[i][1] for i in idx], max_tokens, temperature)
            for i, r in zip(idx, replies):
                out[i] = r
        return out

    async def answer(self, question: str, max_tokens: int, temperature: float = 0.0) -> dict:
        model_id = serve.get_multiplexed_model_id()
        try:
            memory = await self._get_model(model_id)
        except Exception as e:
            return load_error(model_id, e)
        if getattr(memory, "batches_itself", False):
            return (await self._generate(memory, [question], max_tokens, temperature))[0]
        return await self._batched((model_id, question, max_tokens, temperature))

    def __del__(self):  # Serve calls this on a graceful replica shutdown: close this replica's spans
        audit = getattr(self, "audit", None)
        if audit:
            audit.close_all()
