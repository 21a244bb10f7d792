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
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from memo.config import ServeConfig, build_config
from memo.errors import MemoError

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


# Helpers used by the deployments must be defined above them: @serve.ingress copies the class
# with cloudpickle at decoration time, when later module globals do not exist yet.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class MemoryModel:
    """Hosts memory models; many small domains share a replica through @serve.multiplexed (LRU)."""

    def __init__(self, cfg: dict):
        from memo.runtime import quiet

        quiet()
        self.cfg = ServeConfig(**cfg)
        _use_state_of(self.cfg)
        # Decorated here rather than on the class because the LRU size comes from the config.
        async def load(model_id: str):
            return await self._load(model_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)

    async def _load(self, model_id: str):
        from memo import registry
        from memo.models import load_model

        domain, version = model_id.split(":")
        path = await asyncio.to_thread(registry.download_version, domain, version)
        model, tok = await asyncio.to_thread(load_model, str(path))
        try:  # the audit trail is best effort: serving must not fail because the registry is busy
            await asyncio.to_thread(registry.record_serving, domain, serve.get_replica_context().deployment, version)
        except Exception:
            pass
        return model, tok

    async def answer(self, question: str, max_tokens: int) -> dict:
        from memo.memory import ask_memory

        model_id = serve.get_multiplexed_model_id()
        model, tok = await self._get_model(model_id)
        t0 = time.time()
        [text] = await asyncio.to_thread(ask_memory, model, tok, [question], max_tokens)
        n_prompt = len(tok(question)["input_ids"])
        n_out = len(tok(text)["input_ids"])
        return {"text": text, "prompt_tokens": n_prompt, "completion_tokens": n_out,
                "seconds": time.time() - t0}


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Router:
    def __init__(self, memory, cfg: dict):
        from memo.runtime import quiet

        quiet()
        self.memory = memory
        self.cfg = ServeConfig(**cfg)
        _use_state_of(self.cfg)
        self._versions: dict[str, tuple[float, str]] = {}

    async def _version(self, domain: str) -> str:
        """alias -> version, cached for alias_refresh_s so the registry is not hit on every request."""
        from memo import registry

        hit = self._versions.get(domain)
        if hit and time.time() - hit[0] < self.cfg.alias_refresh_s:
            return hit[1]
        version = await asyncio.to_thread(registry.resolve_version, domain, self.cfg.alias)
        self._versions[domain] = (time.time(), version)
        return version

    async def _domains(self) -> list[str]:
        from memo import registry

        return self.cfg.domains or await asyncio.to_thread(registry.list_domains)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for d in await self._domains():
            try:
                version = await self._version(d)
            except MemoError:
                version = None  # registered but the alias is not set yet: listed, not servable
            data.append({"id": d, "object": "model", "owned_by": "memo", "memo_version": version,
                         "memo_alias": self.cfg.alias})
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
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
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return openai_error(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            return openai_error(400, "'messages' needs at least one user message (the question)", "messages")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", self.cfg.max_new_tokens))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return openai_error(400, "'max_tokens' must be a positive integer", "max_tokens")
        if max_tokens > self.cfg.max_tokens_cap:
            return openai_error(400, f"'max_tokens' {max_tokens} is over this server's cap of "
                                     f"{self.cfg.max_tokens_cap}", "max_tokens")
        if domain not in await self._domains():
            return openai_error(404, f"unknown model {domain!r}; GET /v1/models lists the domains", "model",
                                "model_not_found")
        try:
            version = await self._version(domain)
        except MemoError as e:
            return openai_error(404, str(e), "model", "model_not_found")
        # The memory is a single-turn model: each call is a fresh chat with the last user message,
        # in exactly the format it was trained on (other roles would be a format it never saw).
        out = await self.memory.options(multiplexed_model_id=f"{domain}:{version}").answer.remote(
            users[-1], max_tokens)
        resp = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": domain, "memo_version": version, "system_fingerprint": f"memo-{domain}-v{version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": "length" if out["completion_tokens"] >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }
        return JSONResponse(resp, headers={VERSION_HEADER: version})


def build_app(args: dict[str, Any]):
    """Serve app builder: `import_path: memo.serving:build_app` with `args` = ServeConfig fields.

    Runs where the app is built (`serve run` in the repo, or the cluster for `serve deploy`), so that
    is where a default project home is resolved to an absolute path.
    """
    from dataclasses import asdict

    from memo.config import memo_home
    from memo.registry import tracking_uri

    cfg = build_config(ServeConfig, dict(args or {}), "serve config args")
    cfg.memo_home = str(Path(cfg.memo_home).resolve()) if cfg.memo_home else str(memo_home())
    if not cfg.tracking_uri:
        os.environ["MEMO_HOME"] = cfg.memo_home
        cfg.tracking_uri = tracking_uri()
    return Router.bind(MemoryModel.bind(asdict(cfg)), asdict(cfg))


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port (loopback by default) and deploy the router; returns the base URL."""
    from dataclasses import asdict

    # Per-request access lines would bury the caller's own output; errors still reach the driver.
    quiet_logs = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet_logs)
    serve.run(build_app(asdict(cfg)), name="memo", route_prefix="/", blocking=blocking, logging_config=quiet_logs)
    return f"http://{cfg.host}:{cfg.port}"
