"""The OpenAI-compatible router: tenants, validation, alias -> version, and the two products.

  model "<domain>"             the raw memory, one fresh single-turn answer (the memory deployment)
  model "memo/<d1>[+<d2>...]"  the MeMo answer: the executive deployment questions those memories

The alias is resolved to a registry version here, and the version is part of the multiplexed model id
(`<domain>:<version>`): an alias move sends new requests to the new version while in-flight requests
finish on the old one, and every response says exactly which version answered.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in the
# route signatures, or it treats `request` as a query parameter and answers 422.
import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from ray import serve

from memo import registry
from memo.config import ServeConfig
from memo.errors import MemoError
from memo.runtime import quiet
from memo.serving.openai_api import (
    ApiError,
    AskRequest,
    completion_body,
    openai_error,
    parse_request,
    sse_stream,
    usage_block,
)
from memo.serving.replica import use_state_of
from memo.tenants import RateLimiter, TenantsFile, authenticate

VERSION_HEADER = "x-memo-model-version"
log = logging.getLogger("ray.serve")
api = FastAPI(title="MeMo router", version="0.2.0")


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Router:
    def __init__(self, memory, executive, cfg: dict, *dedicated):
        quiet()
        self.memory, self.executive = memory, executive
        self.cfg = ServeConfig(**cfg)
        use_state_of(self.cfg)
        # Hot domains have their own deployment (handles arrive in dedicated_domains order).
        self.dedicated = dict(zip(self.cfg.dedicated_domains, dedicated))
        self._versions: dict[str, tuple[float, str]] = {}
        self.tenants = TenantsFile(self.cfg.tenants_file, self.cfg.tenants_reload_s) if self.cfg.tenants_file else None
        self.limiter = RateLimiter()
        # A registry per replica (not the process-global one): each replica reports its own requests.
        self.metrics_registry = CollectorRegistry()
        self.requests = Counter("memo_requests", "Requests answered, by HTTP status and product",
                                ["status", "product"], registry=self.metrics_registry)
        self.latency = Histogram("memo_request_seconds", "Seconds to answer a successful request", ["product"],
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
        tenant = authenticate(self.tenants.current(), key)
        if tenant is None:
            return None, openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
        ok, wait = self.limiter.allow(tenant)
        if not ok:
            resp = openai_error(429, f"rate limit of {tenant.requests_per_minute_per_replica} requests per minute "
                                     f"(per router replica) reached; retry in {wait:.1f} s", code="rate_limit_exceeded")
            resp.headers["retry-after"] = str(max(1, round(wait)))
            return tenant, resp
        return tenant, None

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
        """Prometheus exposition (prometheus_client): request counts by status and product (memory or
        memo), latency histograms of answered requests, for this replica. Nothing about tenants or keys."""
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
            if self.cfg.serve_executive:
                data.append({"id": f"memo/{d}", "object": "model", "owned_by": "memo", "memo_version": version,
                             "memo_alias": self.cfg.alias})
        return {"object": "list", "data": data}

    async def _ask(self, request: Request, kind: str):
        """Shared path of /v1/chat/completions and /v1/completions: auth, validation, routing, answer."""
        t0, product = time.time(), "memory"
        tenant, resp = self._auth(request)
        if resp is None:
            try:
                try:
                    body = await request.json()
                except Exception:
                    raise ApiError(400, "request body is not valid JSON") from None
                req = parse_request(body, kind, self.cfg)
                product = "memo" if req.executive else "memory"
                resp = await self._answer(req, tenant)
            except ApiError as e:
                resp = e.response()
            except Exception as e:  # counted and OpenAI-shaped; the details stay in the replica's log
                log.exception("memo router: request failed")
                resp = openai_error(500, f"the server could not answer ({type(e).__name__})")
        self.requests.labels(status=str(resp.status_code), product=product).inc()
        if resp.status_code == 200:
            self.latency.labels(product=product).observe(time.time() - t0)
        return resp

    async def _answer(self, req: AskRequest, tenant):
        for d in req.domains:
            if tenant and not tenant.allows(d):
                # 403 whether or not the domain exists: a key learns nothing about domains it may not ask.
                raise ApiError(403, f"this API key may not ask model {d!r}", "model", "model_not_allowed")
        known = await self._domains()
        versions = {}
        for d in req.domains:
            if d not in known:
                raise ApiError(404, f"unknown model {d!r}; GET /v1/models lists the domains", "model",
                               "model_not_found")
            try:
                versions[d] = await self._version(d)
            except MemoError as e:
                raise ApiError(404, str(e), "model", "model_not_found") from None
        if req.executive:
            if not self.cfg.serve_executive:
                raise ApiError(404, "this server does not serve the MeMo answer (serve_executive: false); "
                                    f"ask the memory directly with model {req.domains[0]!r}", "model",
                               "model_not_found")
            out = await self._ask_executive(req, versions)
            extra = {"memo_version": out["memo_version"], "memory_calls": out["memory_calls"],
                     "memo_protocol": out["protocol"], "system_fingerprint": f"memo-{out['memo_version']}"}
            if req.trace:
                extra["memo_trace"] = out["trace"]
            version = out["memo_version"]
        else:
            d = req.domains[0]
            version = versions[d]
            handle = self.dedicated.get(d, self.memory)
            out = await handle.options(multiplexed_model_id=f"{d}:{version}").answer.remote(
                req.question, req.max_tokens, req.temperature or 0.0)
            if "error" in out:
                raise ApiError(503, out["error"], "model", "model_unavailable", out.get("retry_after") or 0.0)
            extra = {"memo_version": version, "system_fingerprint": f"memo-{d}-v{version}"}
            if out.get("confidence") is not None:  # how sure the memory was, and where its version abstains
                extra.update(memo_confidence=out["confidence"], memo_abstain_threshold=out.get("abstain_threshold"))
        usage = usage_block(out["prompt_tokens"], out["completion_tokens"])
        headers = {VERSION_HEADER: version}
        if req.stream:
            return StreamingResponse(sse_stream(req, out["text"], out["finish"], usage, extra),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(completion_body(req, out["text"], out["finish"], usage, extra), headers=headers)

    async def _ask_executive(self, req: AskRequest, versions: dict[str, str]) -> dict:
        # The executive deployment enforces executive_deadline_s itself; this outer bound only guards
        # against a stuck replica, so a request never hangs.
        try:
            out = await asyncio.wait_for(
                self.executive.answer.remote(req.question, versions, req.protocol, req.trace, req.deadline_s),
                self.cfg.executive_deadline_s + 60)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the MeMo answer took longer than {self.cfg.executive_deadline_s + 60:g} s",
                           code="timeout") from None
        if "error" in out:
            raise ApiError(out.get("status", 503), out["error"], "model",
                           "timeout" if out.get("status") == 504 else "model_unavailable", out.get("retry_after") or 0.0)
        # max_tokens bounds the final answer in words: the executive may be a remote API whose tokenizer
        # the router does not know (the protocol's own turns have their budgets in ExecutiveConfig).
        words = out["text"].split()
        if len(words) > req.max_tokens:
            out["text"], out["finish"] = " ".join(words[:req.max_tokens]), "length"
        return out

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._ask(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._ask(request, "completion")
