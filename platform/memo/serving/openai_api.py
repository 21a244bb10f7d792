"""The OpenAI wire format of the router: request validation, response bodies and server-sent-event
streams, for the raw memory (`model: "<domain>"`) and the MeMo answer (`model: "memo/<d1>+<d2>"`).

Pure functions and no Serve: every rule here is unit-tested without a cluster. Each refusal is an
`ApiError` naming the request field (`messages[0].content`, `temperature`, ...), which the router
turns into the OpenAI error shape so SDKs raise their usual exception types.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from memo.config import ServeConfig, check_domain
from memo.errors import MemoError

EXECUTIVE_PREFIX = "memo/"
PROTOCOLS = ("single", "structured")
# C0 controls (but tab, newline, carriage return), DEL and C1 controls: no tokenizer needs them and some
# engines choke on NUL; they are dropped from a question rather than refused.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float = 0.0):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # > 0: a transient failure; the client may ask again after it

    def response(self) -> JSONResponse:
        resp = openai_error(self.status, self.message, self.param, self.code)
        if self.retry_after > 0:  # OpenAI SDKs honour Retry-After when they retry a 503
            resp.headers["retry-after"] = str(max(1, round(self.retry_after)))
        return resp


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """Errors in the OpenAI shape, so OpenAI SDKs raise their usual exception types."""
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}})


@dataclass
class AskRequest:
    """A validated chat or completion request."""
    kind: str                          # chat | completion
    model: str                         # as the client named it (echoed back)
    domains: list[str]                 # the memories asked: one, or several for memo/a+b
    executive: bool                    # memo/...: the executive answers after questioning the memories
    question: str
    max_tokens: int
    temperature: float | None = None
    stream: bool = False
    include_usage: bool = False
    protocol: str | None = None        # memo_protocol: single | structured (default from the config)
    trace: bool = False                # memo_trace: return the protocol trace
    deadline_s: float | None = None    # memo_deadline_s: a tighter deadline than the server's
    extra: dict = field(default_factory=dict)


def clean_text(text: str, where: str) -> str:
    """A question as a tokenizer can take it: a lone surrogate (JSON allows "\\ud800", UTF-8 does not)
    is refused, control characters are dropped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} holds an unpaired UTF-16 surrogate at character {e.start} "
                            "(U+D800..U+DFFF): send valid Unicode text", where) from None
    text = _CONTROL.sub("", text)
    if not text.strip():
        raise ApiError(400, f"{where} holds no text (after removing control characters)", where)
    return text


def message_text(content, where: str) -> str:
    """`content` as a string, or as a list of text parts (the OpenAI format many clients send)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}[{j}]: a part of type {kind!r}; the memory reads text parts only "
                                    '({"type": "text", "text": "..."})', f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a non-empty list of text parts", where)


def parse_model(model, cfg_domains: list[str] | None = None) -> tuple[list[str], bool]:
    """`<domain>` (the raw memory; `memo-<domain>` also accepted) or `memo/<d1>+<d2>` (the MeMo answer)."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a memory domain, or memo/<domain> for the MeMo answer", "model")
    executive = model.startswith(EXECUTIVE_PREFIX)
    names = model[len(EXECUTIVE_PREFIX):].split("+") if executive else [model.removeprefix("memo-")]
    domains = []
    for d in names:
        try:
            check_domain(d, "model")
        except MemoError:
            raise ApiError(404, f"unknown model {model!r}: use a domain (GET /v1/models lists them) or "
                                "memo/<domain>[+<domain>...]", "model", "model_not_found") from None
        if d not in domains:
            domains.append(d)
    return domains, executive


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number from {lo:g} to {hi:g} (got {json.dumps(v)[:40]})", name)
    return float(v)


def parse_request(body, kind: str, cfg: ServeConfig) -> AskRequest:
    """Validate a /v1/chat/completions (kind=chat) or /v1/completions body; raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    domains, executive = parse_model(body.get("model"))
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        question, where = None, "messages"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
            if m["role"] == "user":
                where = f"messages[{i}].content"
                question = message_text(m.get("content"), where)
        if question is None:
            raise ApiError(400, "'messages' needs at least one user message (the question)", "messages")
        # The memory is a single-turn model and the protocols answer one question: the last user
        # message is the question (other roles would be a format the memory never saw).
    else:
        question, where = body.get("prompt"), "prompt"
        if isinstance(question, list) and len(question) == 1:
            question = question[0]
        if not isinstance(question, str):
            raise ApiError(400, "'prompt' must be a non-empty string (the question)", "prompt")
    question = clean_text(question, where)
    if len(question) > cfg.max_prompt_chars:
        raise ApiError(413, f"the question is {len(question)} characters; this server accepts at most "
                            f"{cfg.max_prompt_chars}", where, "prompt_too_large")
    name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    max_tokens = body.get(name, cfg.max_new_tokens)
    if max_tokens is None:
        max_tokens = cfg.max_new_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer", name)
    if max_tokens > cfg.max_tokens_cap:
        raise ApiError(400, f"'{name}' {max_tokens} is over this server's cap of {cfg.max_tokens_cap}", name)
    temperature = _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, f"'n' must be 1: this server returns one choice per request (got {json.dumps(n)[:20]})",
                       "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    protocol = body.get("memo_protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ApiError(400, f"'memo_protocol' must be one of {', '.join(PROTOCOLS)}", "memo_protocol")
    if (protocol is not None or body.get("memo_trace")) and not executive:
        raise ApiError(400, "'memo_protocol' and 'memo_trace' apply to the MeMo answer: use "
                            f"model 'memo/{domains[0]}'", "model")
    trace = body.get("memo_trace", False)
    if not isinstance(trace, bool):
        raise ApiError(400, "'memo_trace' must be true or false", "memo_trace")
    deadline = _number(body, "memo_deadline_s", 0, cfg.executive_deadline_s)
    if deadline is not None and not executive:
        raise ApiError(400, f"'memo_deadline_s' applies to the MeMo answer: use model 'memo/{domains[0]}'", "model")
    return AskRequest(kind, body["model"], domains, executive, question, max_tokens, temperature, stream,
                      bool(options.get("include_usage")), protocol, trace, deadline)


def _ids(kind: str) -> tuple[str, str, str]:
    if kind == "chat":
        return f"chatcmpl-{uuid.uuid4().hex[:24]}", "chat.completion", "chat.completion.chunk"
    return f"cmpl-{uuid.uuid4().hex[:24]}", "text_completion", "text_completion"


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req: AskRequest, text: str, finish: str, usage: dict, extra: dict) -> dict:
    """One non-streamed response; `extra` carries the memo_* fields (version, memory calls, trace)."""
    rid, obj, _ = _ids(req.kind)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if req.kind == "chat" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, **extra,
            "usage": usage, "choices": [choice]}


def _pieces(text: str) -> list[str]:
    """The answer in word-sized deltas; joined, they give back the (stripped) answer."""
    return re.findall(r"\s*\S+", text.strip())


def sse_stream(req: AskRequest, text: str, finish: str, usage: dict, extra: dict) -> Iterator[str]:
    """The answer as OpenAI server-sent events: a role chunk, content deltas, the finish chunk, a usage
    chunk when stream_options.include_usage asks for one, then `data: [DONE]`. The answer is complete
    before the first event (the protocol needs the whole memory exchange first): streaming here is the
    wire format clients expect, not token-by-token latency."""
    rid, _, obj = _ids(req.kind)
    base = {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, **extra}

    def event(choices: list, **more) -> str:
        return "data: " + json.dumps({**base, "choices": choices, **more}) + "\n\n"

    def choice(piece: str | None, finish_reason: str | None) -> dict:
        if req.kind == "chat":
            delta = {} if piece is None else ({"role": "assistant", "content": ""} if piece == "" else
                                                {"content": piece})
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}

    if req.kind == "chat":
        yield event([choice("", None)])
    for piece in _pieces(text):
        yield event([choice(piece, None)])
    yield event([choice(None, finish)])
    if req.include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"
