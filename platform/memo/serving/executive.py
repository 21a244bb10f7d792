"""The MeMo answer as a served product: `model: "memo/<domain>[+<domain>...]"`.

The executive deployment runs a protocol (single or structured) with its LLM (the embedded local
executive on llama.cpp, or any OpenAI-compatible endpoint) and questions the memories through the
memory deployments' handles, in-cluster: no HTTP hop back through the router. Each memory call is a
fresh single-turn question, exactly as `memo ask` does it.

Several domains in one question: every sub-question goes to each named memory; the executive sees the
answers that are not "I don't know", and the trace records which memory said what.

A deadline bounds every question: once it passes, no further memory or executive call starts and the
best answer so far (the memories' answer to the user's own question) comes back with
`finish_reason: "length"`; with nothing to answer, the router returns 504.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from ray import serve

from memo.config import ExecutiveConfig, ServeConfig
from memo.errors import MemoError, Unavailable
from memo.executive import answer_question
from memo.executive.clients import gated, make_executive
from memo.runtime import quiet
from memo.serving.memory import HEALTH
from memo.serving.replica import use_state_of
from memo.text import IDK_ANSWER, is_idk

log = logging.getLogger("ray.serve")


class DeadlineExceeded(Exception):
    """The protocol ran past `executive_deadline_s`: no new call starts."""


class RequestExecutive:
    """The replica's shared executive LLM as one request sees it: its own token counts (the response's
    `usage`) and the request's deadline."""

    def __init__(self, llm, deadline: float):
        self.llm, self.deadline = llm, deadline
        self.usage: Counter = Counter()

    def complete(self, messages, max_tokens=96, temperature=0.0, json_mode=False) -> str:
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded
        r = self.llm.reply(messages, max_tokens, temperature, json_mode)
        self.usage.update(calls=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        return r.text


def combine(answers: list[str]) -> str:
    """Several memories' answers to one question, as the executive sees them: the distinct answers that
    are not "I don't know" (which memory said what stays in the trace, not in the text the guard reads)."""
    known = list(dict.fromkeys(a for a in answers if not is_idk(a)))
    return " / ".join(known) if known else IDK_ANSWER


class ServedMemories:
    """A MemoryClient over memory deployment handles: `targets` = [(domain, version, handle)]. With
    `confidence_gate`, each memory's answer below its version's abstention threshold counts as "I don't
    know" (the raw answer stays in the log and the trace)."""

    def __init__(self, targets: list[tuple[str, str, object]], max_tokens: int, deadline: float,
                 confidence_gate: bool = False):
        self.targets, self.max_tokens, self.deadline = targets, max_tokens, deadline
        self.confidence_gate = confidence_gate
        self.usage: Counter = Counter()
        self.log: list[dict] = []  # every memory call: domain, version, question, answer (gated), raw answer
        self.version = targets[0][1] if len(targets) == 1 else "+".join(f"{d}:{v}" for d, v, _ in targets)

    def ask_detailed(self, questions: list[str]) -> list[dict]:
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded
        # Every (question, memory) call in flight at once: the memory replicas batch them.
        calls = [(q, d, v, h.options(multiplexed_model_id=f"{d}:{v}").answer.remote(q, self.max_tokens))
                 for q in questions for d, v, h in self.targets]
        by_question: dict[str, list[dict]] = {}
        for q, d, v, response in calls:
            try:
                out = response.result(timeout_s=max(0.1, self.deadline - time.monotonic()))
            except TimeoutError:
                raise DeadlineExceeded from None
            if "error" in out:
                if out.get("retry_after"):
                    raise Unavailable(f"memory {d}:{v}: {out['error']}", out["retry_after"])
                raise MemoError(f"memory {d}:{v}: {out['error']}")
            self.usage.update(calls=1, prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"])
            g = gated(out["text"], out.get("confidence"), out.get("abstain_threshold") if self.confidence_gate else None)
            self.log.append({"domain": d, "version": v, "question": q, **g})
            by_question.setdefault(q, []).append(g)
        rows = []
        for q in questions:
            answers = by_question[q]
            row = {"answer": combine([a["answer"] for a in answers])}
            if len(answers) == 1:
                row.update({k: x for k, x in answers[0].items() if k != "answer"})
            elif any("raw_answer" in a for a in answers):
                row["raw_answer"] = combine([a.get("raw_answer", a["answer"]) for a in answers])
            rows.append(row)
        return rows

    def ask(self, questions: list[str]) -> list[str]:
        return [r["answer"] for r in self.ask_detailed(questions)]

    def best_answer(self, question: str) -> str:
        """What the memories said to the user's own question, when the protocol got no further."""
        answer = combine([c["answer"] for c in self.log if c["question"] == question])
        return "" if is_idk(answer) else answer


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8, **HEALTH)
class ExecutiveModel:
    """One executive LLM per replica (a llama-server process with `executive_parallel` slots on CPU, or a
    client of an OpenAI-compatible endpoint); protocols run in threads, memory calls go over handles."""

    def __init__(self, cfg: dict, memory, *dedicated):
        quiet()
        self.cfg = ServeConfig(**cfg)
        use_state_of(self.cfg)
        self.memory = memory
        self.dedicated = dict(zip(self.cfg.dedicated_domains, dedicated))
        # The key comes from the replica's environment (a Serve/RayService secret), never from the config.
        key = os.environ.get(self.cfg.executive_api_key_env) if self.cfg.executive_url else None
        self.llm = make_executive(self.cfg.executive_url, self.cfg.executive_model, key, self.cfg.executive_local,
                                  parallel=self.cfg.executive_parallel)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="executive")

    async def answer(self, question: str, versions: dict[str, str], protocol: str | None, trace: bool,
                     deadline_s: float | None = None) -> dict:
        # The protocols are synchronous (and call handles with .result()), so they run off the event loop.
        seconds = min(deadline_s or self.cfg.executive_deadline_s, self.cfg.executive_deadline_s)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self._answer, question, versions, protocol or self.cfg.executive_protocol, trace, seconds)

    def _answer(self, question: str, versions: dict[str, str], protocol: str, want_trace: bool,
                seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        llm = RequestExecutive(self.llm, deadline)
        memory = ServedMemories([(d, v, self.dedicated.get(d, self.memory)) for d, v in versions.items()],
                                min(ExecutiveConfig().memory_max_tokens, self.cfg.max_tokens_cap), deadline,
                                confidence_gate=self.cfg.executive_confidence_gate)
        try:
            tr = answer_question(question, llm, memory, ExecutiveConfig(
                protocol=protocol, grounding=self.cfg.executive_grounding, chain=self.cfg.executive_chain,
                confidence_gate=self.cfg.executive_confidence_gate))
            text, finish, trace = tr.answer, "stop", asdict(tr)
        except DeadlineExceeded:
            text, finish = memory.best_answer(question), "length"
            trace = {"question": question, "protocol": protocol, "partial": True,
                     "why": f"the protocol ran past its deadline of {seconds:g} s"}
            if not text:
                return {"error": f"no answer within the deadline of {seconds:g} s", "status": 504}
        except MemoError as e:
            log.warning("memo executive: %s", e)
            return {"error": str(e), "status": 503, "retry_after": getattr(e, "retry_after", 0.0)}
        trace["memory_answers"] = memory.log
        return {"text": text, "finish": finish, "prompt_tokens": llm.usage["prompt_tokens"],
                "completion_tokens": llm.usage["completion_tokens"], "memory_calls": memory.usage["calls"],
                "memo_version": memory.version, "protocol": protocol, "trace": trace if want_trace else None}

    def check_health(self) -> None:
        """A local executive's llama-server that died is restarted (here or by the request that finds it
        gone); one that keeps dying fails the check and Serve replaces the replica."""
        engine = getattr(self.llm, "engine", None)
        if hasattr(engine, "heal"):
            engine.heal()
            if engine.failure:
                raise MemoError(f"executive {self.llm.name}: {engine.failure}")

    def __del__(self):
        engine = getattr(getattr(self, "llm", None), "engine", None)
        if hasattr(engine, "close"):  # the llama-server process stops with the replica
            engine.close()
