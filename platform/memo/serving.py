"""Ray Serve: an OpenAI-compatible router in front of per-domain memory models.

The router resolves a domain's alias (e.g. `champion`) to a registry version and asks the memory
deployment for the multiplexed model `<domain>:<version>`. Because the version is part of the model
id, an alias move sends new requests to the new version while in-flight requests finish on the old
one, and every response can say exactly which version answered.
"""


# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in the
# route signatures, or it treats `request` as a query parameter and answers 422.
import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from ray import serve

from memo import registry
from memo.config import ServeConfig, build_config, memo_home, tracking_uri
from memo.errors import MemoError
from memo.engines.memory import MemoryEngine
from memo.models import materialize_full_model
from memo.runtime import quiet
from memo.tenants import RateLimiter, authenticate, load_tenants

VERSION_HEADER = "x-memo-model-version"
api = FastAPI(title="MeMo memory router", version="0.1.0")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """Errors in the OpenAI shape, so OpenAI SDKs raise their usual exception types."""
    etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": etype, "param": param, "code": code}})


def _use_state_of(cfg: ServeConfig) -> None:
    """Point this replica at the project home the app was built with: replicas run in other working
    directories, where a relative MEMO_HOME (or MLflow's ./mlruns default) would find nothing."""
    os.environ["MEMO_HOME"] = cfg.memo_home
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri


def _load_error(model_id: str, e: Exception) -> dict:
    return {"error": f"memory {model_id} could not be loaded: {type(e).__name__}: {e}"}


# Helpers used by the deployments must be defined above them: @serve.ingress copies the class
# with cloudpickle at decoration time, when later module globals do not exist yet.
MAX_ONGOING = 16  # requests in flight per memory replica


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING)
class MemoryModel:
    """Hosts memory models; many small domains share a replica through @serve.multiplexed (LRU).
    Concurrent questions are generated together: on llama.cpp by the server's own continuous batching
    (each request goes straight to a slot), on transformers and vLLM through @serve.batch."""

    def __init__(self, cfg: dict):
        quiet()
        self.cfg = ServeConfig(**cfg)
        _use_state_of(self.cfg)

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

    async def _load(self, model_id: str):
        """One loaded version: a MemoryEngine (llama.cpp server process or transformers model) or vLLM.
        When the multiplexed LRU drops it, its engine is closed (a llama-server process stops)."""
        domain, version = model_id.split(":")
        path = await asyncio.to_thread(registry.download_version, domain, version)
        if self.cfg.engine == "vllm":
            from memo.engines.vllm import VLLMMemory

            full = await asyncio.to_thread(materialize_full_model, path)  # vLLM needs merged weights
            memory = await asyncio.to_thread(VLLMMemory, str(full), self.cfg.max_models_per_replica)
        else:
            memory = await asyncio.to_thread(MemoryEngine, str(path), self.cfg.engine, self.cfg.engine_threads,
                                             self.cfg.engine_parallel)
        try:  # the audit trail is best effort: serving must not fail because the registry is busy
            await asyncio.to_thread(registry.record_serving, domain, serve.get_replica_context().deployment, version)
        except Exception:
            pass
        return memory

    async def _generate(self, memory, questions: list[str], max_tokens: int) -> list[dict]:
        t0 = time.time()
        replies = await asyncio.get_running_loop().run_in_executor(self._pool, memory.ask, questions, max_tokens)
        return [{"error": f"the memory could not answer: {r.error}"} if r.error else {
            "text": r.text, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "finish": r.finish, "seconds": time.time() - t0, "batch_size": len(questions)} for r in replies]

    async def _generate_batch(self, requests: list) -> list:
        """One batch of (model_id, question, max_tokens): one generate call per (model, length) group."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, (model_id, _, max_tokens) in enumerate(requests):
            groups.setdefault((model_id, max_tokens), []).append(i)
        for (model_id, max_tokens), idx in groups.items():
            try:  # one version failing to load must not fail the other domains batched with it
                memory = await self._get_model(model_id)
            except Exception as e:
                for i in idx:
                    out[i] = _load_error(model_id, e)
                continue
            for i, r in zip(idx, await self._generate(memory, [requests[i][1] for i in idx], max_tokens)):
                out[i] = r
        return out

    async def answer(self, question: str, max_tokens: int) -> dict:
        model_id = serve.get_multiplexed_model_id()
        try:
            memory = await self._get_model(model_id)
        except Exception as e:
            return _load_error(model_id, e)
        if getattr(memory, "batches_itself", False):
            return (await self._generate(memory, [question], max_tokens))[0]
        return await self._batched((model_id, question, max_tokens))


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Router:
    def __init__(self, memory, cfg: dict, *dedicated):
        quiet()
        self.memory = memory
        self.cfg = ServeConfig(**cfg)
        _use_state_of(self.cfg)
        # Hot domains have their own deployment (handles arrive in dedicated_domains order).
        self.dedicated = dict(zip(self.cfg.dedicated_domains, dedicated))
        self._versions: dict[str, tuple[float, str]] = {}
        self.tenants = load_tenants(self.cfg.tenants_file) if self.cfg.tenants_file else None
        self.limiter = RateLimiter()
        # A registry per replica (not the process-global one): each replica reports its own requests.
        self.metrics_registry = CollectorRegistry()
        self.requests = Counter("memo_requests", "Requests answered, by HTTP status", ["status"],
                                registry=self.metrics_registry)
        self.latency = Histogram("memo_request_seconds", "Seconds to answer a successful request",
                                 registry=self.metrics_registry)

    def _auth(self, request: Request):
        """(tenant or None, error response or None). No tenants file: anonymous, loopback only."""
        if self.tenants is None:
            # No keys: loopback clients only, whatever address the proxy listens on (serve run with
            # http_options.host 0.0.0.0 must not open an anonymous router to the network).
            client = request.client.host if request.client else ""
            if self.cfg.allow_anonymous or client in ("127.0.0.1", "::1", "localhost"):
                return None, None
            return None, openai_error(401, "this router has no tenants file: only loopback clients may call it",
                                      code="invalid_api_key")
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
        tenant = authenticate(self.tenants, key)
        if tenant is None:
            return None, openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
        ok, wait = self.limiter.allow(tenant)
        if not ok:
            resp = openai_error(429, f"rate limit of {tenant.requests_per_minute} requests per minute reached; "
                                     f"retry in {wait:.1f} s", code="rate_limit_exceeded")
            resp.headers["retry-after"] = str(max(1, round(wait)))
            return tenant, resp
        return tenant, None

    def _count(self, status: int, seconds: float | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    async def _version(self, domain: str) -> str:
        """alias -> version, cached for alias_refresh_s so the registry is not hit on every request."""
        hit = self._versions.get(domain)
        if hit and time.time() - hit[0] < self.cfg.alias_refresh_s:
            return hit[1]
        version = await asyncio.to_thread(registry.resolve_version, domain, self.cfg.alias)
        self._versions[domain] = (time.time(), version)
        return version

    async def _domains(self) -> list[str]:
        return self.cfg.domains or await asyncio.to_thread(registry.list_domains)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self):
        """Prometheus exposition (prometheus_client): request counts by status and the latency histogram
        of answered requests, for this replica. Nothing about tenants or keys."""
        return Response(generate_latest(self.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request):
        tenant, error = self._auth(request)
        if error:
            return error
        data = []
        for d in await self._domains():
            if tenant and not tenant.allows(d):
                continue  # a tenant sees only the domains its key may ask
            try:
                version = await self._version(d)
            except MemoError:
                version = None  # registered but the alias is not set yet: listed, not servable
            data.append({"id": d, "object": "model", "owned_by": "memo", "memo_version": version,
                         "memo_alias": self.cfg.alias})
        return {"object": "list", "data": data}

    async def _ask(self, request: Request, kind: str):
        """Shared path of /v1/chat/completions and /v1/completions: auth, validation, routing, answer."""
        t0 = time.time()
        tenant, error = self._auth(request)
        if error:
            self._count(error.status_code)
            return error
        try:
            resp = await self._ask_checked(request, kind, tenant)
        except Exception as e:  # counted and OpenAI-shaped; the details stay in the replica's log
            import logging

            logging.getLogger("ray.serve").exception("memo router: request failed")
            resp = openai_error(500, f"the memory could not answer ({type(e).__name__})")
        self._count(resp.status_code, time.time() - t0 if resp.status_code == 200 else None)
        return resp

    async def _ask_checked(self, request: Request, kind: str, tenant):
        try:
            body = await request.json()
        except Exception:
            return openai_error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return openai_error(400, "request body must be a JSON object")
        domain = body.get("model")
        if not isinstance(domain, str) or not domain:
            return openai_error(400, "'model' is required: the memory domain to ask", "model")
        domain = domain.removeprefix("memo-")
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                return openai_error(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
            users = [m["content"] for m in messages if m.get("role") == "user"]
            if not users:
                return openai_error(400, "'messages' needs at least one user message (the question)", "messages")
            # The memory is a single-turn model: each call is a fresh chat with the last user message,
            # in exactly the format it was trained on (other roles would be a format it never saw).
            question, field_name = users[-1], "messages"
        else:
            question, field_name = body.get("prompt"), "prompt"
            if isinstance(question, list) and len(question) == 1:
                question = question[0]
            if not isinstance(question, str) or not question.strip():
                return openai_error(400, "'prompt' must be a non-empty string (the question)", "prompt")
        if len(question) > self.cfg.max_prompt_chars:
            return openai_error(413, f"the question is {len(question)} characters; this server accepts at most "
                                     f"{self.cfg.max_prompt_chars}", field_name, "prompt_too_large")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", self.cfg.max_new_tokens))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return openai_error(400, "'max_tokens' must be a positive integer", "max_tokens")
        if max_tokens > self.cfg.max_tokens_cap:
            return openai_error(400, f"'max_tokens' {max_tokens} is over this server's cap of "
                                     f"{self.cfg.max_tokens_cap}", "max_tokens")
        if tenant and not tenant.allows(domain):
            # 403 whether or not the domain exists: a key learns nothing about domains it may not ask.
            return openai_error(403, f"this API key may not ask model {domain!r}", "model", "model_not_allowed")
        if domain not in await self._domains():
            return openai_error(404, f"unknown model {domain!r}; GET /v1/models lists the domains", "model",
                                "model_not_found")
        try:
            version = await self._version(domain)
        except MemoError as e:
            return openai_error(404, str(e), "model", "model_not_found")
        handle = self.dedicated.get(domain, self.memory)
        out = await handle.options(multiplexed_model_id=f"{domain}:{version}").answer.remote(question, max_tokens)
        if "error" in out:
            return openai_error(503, out["error"], "model", "model_unavailable")
        finish = out.get("finish", "length" if out["completion_tokens"] >= max_tokens else "stop")
        common = {"created": int(time.time()), "model": domain, "memo_version": version,
                  "system_fingerprint": f"memo-{domain}-v{version}",
                  "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}}
        if kind == "chat":
            resp = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", **common,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "finish_reason": finish}]}
        else:
            resp = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", **common,
                    "choices": [{"index": 0, "text": out["text"], "finish_reason": finish, "logprobs": None}]}
        return JSONResponse(resp, headers={VERSION_HEADER: version})

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._ask(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._ask(request, "completion")


def build_app(args: dict[str, Any]):
    """Serve app builder: `import_path: memo.serving:build_app` with `args` = ServeConfig fields.

    Runs where the app is built (`serve run` in the repo, or the cluster for `serve deploy`), so that
    is where a default project home is resolved to an absolute path.
    """
    cfg = build_config(ServeConfig, dict(args or {}), "serve config args")
    cfg.memo_home = str(Path(cfg.memo_home).resolve()) if cfg.memo_home else str(memo_home())
    if not cfg.tracking_uri:
        os.environ["MEMO_HOME"] = cfg.memo_home
        cfg.tracking_uri = tracking_uri()
    if cfg.tenants_file:
        cfg.tenants_file = str(Path(cfg.tenants_file).resolve())
        load_tenants(cfg.tenants_file)  # a bad tenants file fails here, before any replica starts
    args_ = cfg.model_dump()
    actor = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}
    dedicated = [MemoryModel.options(
        name=f"MemoryModel-{d}", ray_actor_options=actor,
        autoscaling_config={"min_replicas": cfg.dedicated_min_replicas, "max_replicas": cfg.dedicated_max_replicas,
                            "target_ongoing_requests": cfg.max_batch_size}).bind(args_)
        for d in cfg.dedicated_domains]
    return Router.bind(MemoryModel.options(ray_actor_options=actor).bind(args_), args_, *dedicated)


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port (loopback by default) and deploy the router; returns the base URL."""
    # Per-request access lines would bury the caller's own output; errors still reach the driver.
    quiet_logs = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet_logs)
    serve.run(build_app(cfg.model_dump()), name="memo", route_prefix="/", blocking=blocking, logging_config=quiet_logs)
    return f"http://{cfg.host}:{cfg.port}"
