"""The LLM GENERATOR: the method's five synthesis steps as Ray Data stages over one engine.

  1 extract      two passes per chunk: direct facts, then indirect facts (relations both ways, computed
                 attributes, resolved pronouns and times)
  2 consolidate  per document with >= 3 pairs: composite questions over 2-4+ pairs, recording which
  3 verify       a judge checks each pair of steps 1-2 for self-containment; a failing pair is rewritten
                 from its source chunk and re-checked, up to `verify_attempts` times, then discarded
  4 entity       questions that describe an entity without naming it (one fact, two, 3+, via a relation)
  5 cross_doc    converging-clue and parallel-property questions over groups of related documents, the
                 groups formed from the corpus alone (shared names, BM25 neighbours)

Engines, chosen by config, behind one `chat(batch) -> replies` interface, so the steps never know which:
  hf    a local transformers model, loaded once per Ray Data actor (CPU)
  http  any OpenAI-compatible endpoint: bounded concurrency, retries with backoff, per-request timeouts
  vllm  ONE Ray Serve LLM application (`ray.serve.llm`, vLLM) started for the whole run and reached
        over HTTP by the same `http` engine. Why not `ray.data.llm.build_processor` per step: five steps
        would start five vLLM engines (minutes of load and a GPU each, one after the other), while one
        served generator is loaded once, shared by every step's actors and batched across them by vLLM.

Each step is resumable and loss-free: every input row has a stable id; each finished batch is written
atomically to OUT/steps/<settings>/<step>/part-*.parquet together with the ids it consumed, so a re-run
skips finished inputs, and a row that fails (no JSON after retries, engine error, over-long chunk, a pair
that names what it should not) is written to the rejects with its reason instead of failing the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from memo.errors import MemoError

JUDGE_MAX_TOKENS = 48  # {"ok": false, "violations": ["unresolved_pronoun", "relative_time"]} is ~20 tokens
PROMPT_VERSION = "v1"  # part of the step folders' key: a prompt change never mixes with older outputs
VIOLATIONS = ("unresolved_pronoun", "relative_time", "document_reference", "vague_reference", "missing_context",
              "incomplete_answer")
# One schema for every step's output: pairs, rejects ("reason" set) and inputs that gave nothing.
STEP_COLUMNS = ["input_id", "status", "step", "kind", "question", "answer", "source_chunk_ids", "merged_from",
                "verified", "reason", "raw", "calls", "prompt_tokens", "completion_tokens"]


# ---------------------------------------------------------------------------------------------------
# Engines

@dataclass
class Reply:
    text: str = ""
    error: str = ""                 # engine_error / too_long / timeout ...: the row is rejected with it
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HttpEngine:
    """Any OpenAI-compatible chat endpoint. Up to `concurrency` requests in flight per actor; connection
    errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter; other 4xx are not."""

    def __init__(self, base_url: str, model: str, api_key: str = "", concurrency: int = 8, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0):
        import logging

        import openai

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        self._openai = openai
        # The SDK's own retries are off: ours count, back off with jitter and end in a reject, not a raise.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self.model, self.concurrency, self.retries, self.backoff = model, concurrency, retries, backoff
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, messages: list[dict], max_tokens: int, temperature: float) -> Reply:
        o = self._openai
        for attempt in range(self.retries + 1):
            try:
                r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                        temperature=temperature)
                u = r.usage
                return Reply((r.choices[0].message.content or "").strip(), "",
                             getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0)
            except (o.APIConnectionError, o.APITimeoutError, o.RateLimitError, o.InternalServerError) as e:
                err = f"engine_error: {type(e).__name__} after {attempt + 1} attempt(s)"
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))
            except o.APIStatusError as e:  # 400/401/404/413...: the same request will fail again
                status = e.status_code
                if status == 400 and "context" in str(e).lower():
                    return Reply(error="too_long: the endpoint refused the prompt's length")
                return Reply(error=f"engine_error: HTTP {status}: {str(e)[:160]}")
        return Reply(error=err)

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float) -> list[Reply]:
        return list(self.pool.map(lambda m: self._one(m, max_tokens, temperature), batch))


class HfEngine:
    """A local transformers chat model; the batch is generated together (left padding)."""

    def __init__(self, model: str, threads: int = 0, max_prompt_tokens: int = 0):
        import torch

        from memo.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_model(model)
        limit = getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float) -> list[Reply]:
        from memo.memory import generate, prompt_ids

        lens = [len(prompt_ids(self.tok, m)) for m in batch]
        ok = [i for i, n in enumerate(lens) if n + max_tokens <= self.max_prompt_tokens]
        replies = [Reply(error=f"too_long: {n} prompt tokens + {max_tokens} > the model's "
                               f"{self.max_prompt_tokens}") for n in lens]
        # Similar lengths together: left padding a short prompt to a long one costs compute for nothing.
        ok.sort(key=lambda i: lens[i])
        for j in range(0, len(ok), 8):
            idx = ok[j:j + 8]
            try:
                outs = generate(self.model, self.tok, [batch[i] for i in idx], max_tokens, temperature)
            except Exception as e:  # noqa: BLE001 - one bad batch is rejected, the job goes on
                for i in idx:
                    replies[i] = Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
                continue
            for i, text in zip(idx, outs):
                replies[i] = Reply(text, "", lens[i], len(self.tok(text, add_special_tokens=False)["input_ids"]))
        return replies


def engine_spec(cfg) -> dict:
    """What an actor needs to build its engine. The key is read from the driver's environment here and
    travels to the actors inside the pickled constructor arguments: workers on a cluster do not share the
    driver's environment, and a runtime_env would show it in the dashboard. It never enters stats or MLflow."""
    if cfg.generator == "hf":
        from memo.models import resolve_base_model

        model = cfg.model or "smollm2-135m"
        return {"kind": "hf", "model": model if Path(model).is_dir() else resolve_base_model(model),
                "max_prompt_tokens": 0}
    return {"kind": "http", "base_url": cfg.base_url, "model": cfg.model, "api_key": os.environ.get(cfg.api_key_env, ""),
            "concurrency": cfg.concurrency, "timeout": cfg.request_timeout, "retries": cfg.retries}


def actor_resources(spec: dict, actors: int) -> tuple[float, int]:
    """(num_cpus, torch threads) per actor: an hf actor owns its share of the node's CPUs; an http actor
    waits on the network and needs only a sliver (so it also runs beside Serve replicas)."""
    if spec["kind"] != "hf":
        return 0.25, 0
    import ray

    share = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
    return float(share), share


def make_engine(spec: dict, threads: int = 0):
    if spec["kind"] == "hf":
        return HfEngine(spec["model"], threads, spec.get("max_prompt_tokens", 0))
    return HttpEngine(spec["base_url"], spec["model"], spec.get("api_key", ""),
                      spec.get("concurrency", 8), spec.get("timeout", 120.0), spec.get("retries", 3),
                      spec.get("backoff", 1.0))


def start_vllm_generator(cfg, port: int = 8000) -> str:
    """Start one vLLM generator as a Ray Serve LLM app for the whole run; returns its OpenAI base URL."""
    try:
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app
    except Exception as e:  # noqa: BLE001 - ray.serve.llm raises ImportError or its own error without vLLM
        raise MemoError(f"--generator vllm: vLLM is not importable here ({str(e)[:120]}); install the GPU extra "
                        "(pip install 'memo-platform[gpu]') on a GPU cluster, or use --generator http|hf") from None
    llm = LLMConfig(model_loading_config={"model_id": cfg.model, "model_source": cfg.model_source or cfg.model},
                    deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": cfg.workers}},
                    engine_kwargs={"max_model_len": cfg.max_chunk_tokens * 2 + cfg.max_tokens})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [llm]}), name="memo-generator", route_prefix="/generator")
    return f"http://127.0.0.1:{port}/generator/v1"


# ---------------------------------------------------------------------------------------------------
# Prompts (written for this project) and their parsers. Every reply is one JSON object.

SYSTEM = ("You write training data for a memory model that will answer questions without seeing any document. "
          "Every question and every answer must stand alone: full names instead of pronouns, absolute dates "
          "instead of relative ones, and never a reference to 'the document', 'the text' or 'the passage'. "
          "Reply with one JSON object and nothing else.")


def _source(chunk: dict) -> str:
    head = f"Title: {chunk['title']}\n" + (f"Date: {chunk['doc_date']}\n" if chunk.get("doc_date") else "")
    return f"{head}\n{chunk['text']}"


def prompt_direct(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nWrite one question/answer pair for every fact this text states explicitly: "
            "each named person, place, organisation, work, number, role and date, minor ones included. "
            "Answers are 1-4 sentences and repeat the names they refer to.\n"
            'JSON: {"pairs": [{"question": "...", "answer": "..."}]}')


def prompt_indirect(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nWrite question/answer pairs for facts that need two or more sentences of this "
            "text combined: computed attributes (an age at an event, a duration), both directions of a relation "
            "(if X founded Y, ask who founded Y and also what X founded), pronouns resolved to the names they "
            "stand for, relative times made absolute with the date above, and a chain of actions asked from "
            "several angles. Answers are 1-4 sentences.\n"
            'JSON: {"pairs": [{"question": "...", "answer": "..."}]}')


def prompt_consolidate(title: str, pairs: list[dict]) -> str:
    listing = "\n".join(f"p{i + 1}. Q: {p['question']} A: {p['answer']}" for i, p in enumerate(pairs))
    return (f"Question/answer pairs about the document \"{title}\":\n{listing}\n\nMerge pairs that share "
            "something (an entity, a time, a cause and its effect, a sequence, a contrast) into composite "
            "questions over 2, 3 or 4 or more facts. Each answer covers every merged fact in at most 150 words. "
            "'merged' lists the ids of the pairs used.\n"
            'JSON: {"composites": [{"merged": ["p1", "p3"], "question": "...", "answer": "..."}]}')


def prompt_judge(question: str, answer: str) -> str:
    return (f"Question: {question}\nAnswer: {answer}\n\nDoes this pair stand alone for a reader who has never "
            "seen its source? Violations: " + ", ".join(VIOLATIONS) + ".\n"
            'JSON: {"ok": true, "violations": []} or {"ok": false, "violations": ["..."]}')


def prompt_rewrite(chunk: dict, question: str, answer: str, violations: list[str]) -> str:
    return (f"{_source(chunk)}\n\nThis question/answer pair about the text fails the stand-alone check "
            f"({', '.join(violations) or 'unclear'}):\nQuestion: {question}\nAnswer: {answer}\n\n"
            "Rewrite both from the text so that they stand alone and the answer is complete.\n"
            'JSON: {"question": "...", "answer": "..."}')


def prompt_entity(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nFor each named entity of this text (person, place, organisation, work, event), "
            "write questions that describe it WITHOUT naming it: by one distinctive fact (one_fact), by two "
            "facts (two_facts), by three or more facts (many_facts), and through its relation to another named "
            "entity (relation). The answer names the entity and repeats 1-2 facts that confirm it.\n"
            'JSON: {"entities": [{"name": "...", "questions": [{"kind": "one_fact", "question": "...", '
            '"answer": "..."}]}]}')


def prompt_cross(docs: list[dict], why: str) -> str:
    body = "\n\n".join(f"[{i + 1}] {_source(d)}" for i, d in enumerate(docs))
    return (f"These documents are related ({why}):\n\n{body}\n\nWrite questions whose answer needs facts from two "
            "or more of these documents: converging clues (facts from different documents that point to one "
            "entity; the answer names it and the facts) and parallel properties (which entities share one "
            "specific property; the answer lists them). 'documents' lists the numbers of the documents used.\n"
            'JSON: {"questions": [{"kind": "converging", "question": "...", "answer": "...", "documents": [1, 2]}]}')


def _messages(user: str, nudge: bool = False) -> list[dict]:
    if nudge:  # the re-ask after an unparseable reply
        user += "\nYour previous reply was not valid JSON. Reply with the JSON object only."
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _text(v) -> str:
    return re.sub(r"\s+", " ", v).strip() if isinstance(v, str) else ""


def _pairs(obj: dict, key: str) -> list[dict]:
    items = obj.get(key)
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


_QA = re.compile(r'\{\s*"question"\s*:\s*"((?:\\.|[^"\\])*)"\s*,\s*"answer"\s*:\s*"((?:\\.|[^"\\])*)"\s*\}?')


def salvage_pairs(text: str) -> list[dict]:
    """Every complete {"question": ..., "answer": ...} object in a reply, in order, each once."""
    seen, out = set(), []
    for q, a in _QA.findall(text or ""):
        try:
            q, a = json.loads(f'"{q}"'), json.loads(f'"{a}"')
        except json.JSONDecodeError:
            continue
        if (q, a) not in seen:
            seen.add((q, a))
            out.append({"question": q, "answer": a})
    return out


_META = re.compile(r"\bjson\b|\bthe (text|passage|document|story) (above|below)\b|\bthis (json|prompt)\b", re.I)


def picked(refs, n: int, prefix: str = "") -> list[int]:
    """0-based indexes of the items a reply refers to by number ("p3" or 3, counting from 1), each once,
    in order; references out of range or malformed are ignored."""
    out = set()
    for r in refs if isinstance(refs, list) else []:
        m = re.fullmatch(rf"{prefix}(\d+)", str(r).strip())
        if m and 0 < int(m.group(1)) <= n:
            out.add(int(m.group(1)) - 1)
    return sorted(out)


def check_pair(question: str, answer: str) -> str:
    """Shape checks every generated pair passes, whatever the engine: empty, echo, or not a question."""
    if len(question) < 8 or len(answer) < 1:
        return "empty_field"
    if question.lower() == answer.lower():
        return "answer_repeats_question"
    if len(question) > 600 or len(answer) > 1500:
        return "over_long_pair"
    if "?" not in question:
        return "not_a_question"
    if _META.search(question) or _META.search(answer):  # the prompt leaking into the pair
        return "mentions_the_prompt"
    return ""


# ---------------------------------------------------------------------------------------------------
# Step worker: one Ray Data actor class for every step; the step decides prompts and parsing.

def _row(input_id, status, step, kind="", question="", answer="", chunk_ids=(), merged=(), verified=False,
         reason="", raw="") -> dict:
    return {"input_id": input_id, "status": status, "step": step, "kind": kind, "question": question,
            "answer": answer, "source_chunk_ids": list(chunk_ids), "merged_from": list(merged),
            "verified": verified, "reason": reason, "raw": raw[:500], "calls": 0, "prompt_tokens": 0,
            "completion_tokens": 0}


class StepWorker:
    """`map_batches` callable class: builds the engine once per actor, then turns input rows of one step
    into output rows (STEP_COLUMNS). Every input yields at least one row, so a re-run knows it is done."""

    def __init__(self, step: str, engine: dict, max_tokens: int, temperature: float, json_retries: int,
                 verify_attempts: int = 5, max_chunk_tokens: int = 3000, threads: int = 0):
        self.step, self.max_tokens, self.temperature = step, max_tokens, temperature
        self.json_retries, self.verify_attempts, self.max_chunk_tokens = json_retries, verify_attempts, max_chunk_tokens
        self.engine = engine if hasattr(engine, "chat") else make_engine(engine, threads)

    # One round trip for many prompts, with re-asks for the replies that are not JSON.
    def ask(self, prompts: list[str], usage: list[Counter], max_tokens: int = 0,
            salvage: str = "") -> list[tuple[dict | None, str, str]]:
        """(object, error, raw reply) per prompt. With `salvage`, a reply whose JSON is broken beyond repair
        (mismatched brackets, a list repeated until max_tokens) still yields the question/answer objects
        it spells out whole, as {salvage: [...]}."""
        from memo.executive import parse_json

        results: list[tuple[dict | None, str, str]] = [(None, "", "")] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.json_retries + 1):
            replies = self.engine.chat([_messages(prompts[i], attempt > 0) for i in pending],
                                       max_tokens or self.max_tokens, self.temperature)
            retry = []
            for i, r in zip(pending, replies):
                usage[i].update(calls=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
                if r.error:
                    results[i] = (None, r.error, r.text)
                    continue
                obj, _how = parse_json(r.text)
                if salvage and (obj is None or not _pairs(obj, salvage)):
                    found = salvage_pairs(r.text)
                    obj = {salvage: found} if found else obj
                results[i] = (obj, "" if obj is not None else "bad_json", r.text)
                if obj is None:
                    retry.append(i)
            pending = retry
            if not pending:
                break
        return results

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        usage = [Counter() for _ in records]
        rows_per_input = getattr(self, f"_{self.step}")(records, usage)
        out = []
        for rec, rows, u in zip(records, rows_per_input, usage):
            if not rows:
                rows = [_row(rec["input_id"], "empty", self.step, reason="no pairs in the reply")]
            rows[0].update(calls=u["calls"], prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"])
            out += rows
        return pd.DataFrame(out, columns=STEP_COLUMNS)

    def _too_long(self, rec: dict) -> str:
        n = len(rec["text"].split()) if "text" in rec else 0
        return f"too_long: {n} words > max_chunk_tokens={self.max_chunk_tokens}" if n > self.max_chunk_tokens else ""

    def _reject(self, rec, reason, raw="", kind="") -> dict:
        return _row(rec["input_id"], "reject", self.step, kind, reason=reason, raw=raw,
                    chunk_ids=rec.get("chunk_ids", [rec.get("chunk_id", "")]))

    def _too_few(self, rec, kind, item: dict, reason: str) -> dict:
        """A merge or cross-document question that does not use enough of its sources."""
        return _row(rec["input_id"], "reject", self.step, kind, _text(item.get("question")),
                    _text(item.get("answer")), rec["chunk_ids"], reason=reason)

    def _pair(self, rec, kind, q, a, chunk_ids, merged=()) -> dict:
        q, a = _text(q), _text(a)
        bad = check_pair(q, a)
        if bad:
            return _row(rec["input_id"], "reject", self.step, kind, q, a, chunk_ids, merged, reason=bad)
        return _row(rec["input_id"], "ok", self.step, kind, q, a, chunk_ids, merged)

    def _run(self, records, usage, make_prompt, parse, salvage: str = "") -> list[list[dict]]:
        """Shared body: a prompt per record (or a reject), one engine round, a parse per reply."""
        out: list[list[dict]] = [[] for _ in records]
        todo = []
        for i, rec in enumerate(records):
            reason = self._too_long(rec)
            if reason:
                out[i] = [self._reject(rec, reason)]
            else:
                todo.append(i)
        answers = self.ask([make_prompt(records[i]) for i in todo], [usage[i] for i in todo], salvage=salvage)
        for i, (obj, err, raw) in zip(todo, answers):
            out[i] = [self._reject(records[i], err, raw)] if obj is None else parse(records[i], obj, raw)
        return out

    # Step 1: extraction; the input row is (chunk, pass).
    def _extract(self, records, usage):
        def prompt(rec):
            return prompt_direct(rec) if rec["pass"] == "direct" else prompt_indirect(rec)

        def parse(rec, obj, raw):
            pairs = _pairs(obj, "pairs")
            if not pairs:
                return [self._reject(rec, "no_pairs_in_json", raw, rec["pass"])]
            return [self._pair(rec, rec["pass"], p.get("question"), p.get("answer"), [rec["chunk_id"]]) for p in pairs]

        return self._run(records, usage, prompt, parse, salvage="pairs")

    # Step 2: consolidation; the input row is one document with its step-1 pairs.
    def _consolidate(self, records, usage):
        def prompt(rec):
            return prompt_consolidate(rec["title"], rec["pairs"])

        def parse(rec, obj, raw):
            rows = []
            for c in _pairs(obj, "composites"):
                idx = picked(c.get("merged"), len(rec["pairs"]), "p")
                if len(idx) < 2:
                    rows.append(self._too_few(rec, "composite", c, "merged_fewer_than_2_pairs"))
                    continue
                ids = [rec["pairs"][k]["pair_id"] for k in idx]
                chunks = sorted({cid for k in idx for cid in rec["pairs"][k]["source_chunk_ids"]})
                rows.append(self._pair(rec, f"composite_{min(len(idx), 4)}", c.get("question"), c.get("answer"),
                                       chunks, ids))
            return rows or [self._reject(rec, "no_pairs_in_json", raw, "composite")]

        return self._run(records, usage, prompt, parse)

    # Step 3: verification; the input row is one pair plus its source chunk. Judge -> rewrite -> judge...
    def _verify(self, records, usage):
        from memo.reflections import check_self_contained

        cur = [(r["question"], r["answer"]) for r in records]
        status: list[str] = ["pending"] * len(records)
        last: list[str] = [""] * len(records)
        rewritten = [False] * len(records)
        for attempt in range(self.verify_attempts):
            pending = [i for i, s in enumerate(status) if s == "pending"]
            if not pending:
                break
            # A verdict is a few tokens of JSON: capping it keeps a rambling judge from costing a whole reply.
            verdicts = self.ask([prompt_judge(*cur[i]) for i in pending], [usage[i] for i in pending],
                                min(self.max_tokens, JUDGE_MAX_TOKENS))
            failing = []
            for i, (obj, err, raw) in zip(pending, verdicts):
                rule = check_self_contained(*cur[i])  # a deterministic floor under the judge
                violations = [v for v in (obj or {}).get("violations", []) if isinstance(v, str)] if obj else []
                if obj is not None and obj.get("ok") is True and not rule and not violations:
                    status[i] = "ok"
                    continue
                last[i] = err or rule or ", ".join(violations) or "judge said not ok"
                if err.startswith(("engine_error", "too_long")):
                    status[i] = "error"
                    continue
                failing.append((i, violations + ([rule.replace(" ", "_")] if rule else [])))
            if attempt == self.verify_attempts - 1 or not failing:
                break
            fixes = self.ask([prompt_rewrite(records[i], *cur[i], v) for i, v in failing], [usage[i] for i, _ in failing])
            for (i, _v), (obj, err, raw) in zip(failing, fixes):
                q, a = _text((obj or {}).get("question")), _text((obj or {}).get("answer"))
                if obj is not None and not check_pair(q, a):
                    cur[i], rewritten[i] = (q, a), True
                elif err.startswith(("engine_error", "too_long")):
                    status[i], last[i] = "error", err
        out = []
        for i, rec in enumerate(records):
            q, a = cur[i]
            if status[i] == "ok":
                row = _row(rec["input_id"], "ok", self.step, "rewritten" if rewritten[i] else "passed", q, a,
                           rec["source_chunk_ids"], rec["merged_from"], verified=True)
            else:
                reason = last[i] if status[i] == "error" else f"unverified after {self.verify_attempts} attempt(s): {last[i]}"
                row = _row(rec["input_id"], "reject", self.step, rec["kind"], q, a, rec["source_chunk_ids"],
                           rec["merged_from"], reason=reason)
            out.append([row])
        return out

    # Step 4: entity surfacing; the input row is a chunk.
    def _entity(self, records, usage):
        def parse(rec, obj, raw):
            rows = []
            for ent in _pairs(obj, "entities"):
                name = _text(ent.get("name"))
                for q in _pairs(ent, "questions"):
                    kind = _text(q.get("kind")) or "one_fact"
                    row = self._pair(rec, kind, q.get("question"), q.get("answer"), [rec["chunk_id"]])
                    if row["status"] == "ok" and (not name or name.lower() in row["question"].lower()):
                        row.update(status="reject", reason="question_names_the_entity" if name else "no_entity_name")
                    elif row["status"] == "ok" and name.lower() not in row["answer"].lower():
                        row.update(status="reject", reason="answer_does_not_name_the_entity")
                    rows.append(row)
            return rows or [self._reject(rec, "no_pairs_in_json", raw, "entity")]

        return self._run(records, usage, prompt_entity, parse)

    # Step 5: cross-document synthesis; the input row is a group of chunks.
    def _cross_doc(self, records, usage):
        def prompt(rec):
            return prompt_cross(rec["docs"], rec["why"])

        def parse(rec, obj, raw):
            rows = []
            for q in _pairs(obj, "questions"):
                used = picked(q.get("documents"), len(rec["docs"]))
                kind = _text(q.get("kind")) or "converging"
                if len(used) < 2:
                    rows.append(self._too_few(rec, kind, q, "fewer_than_2_documents"))
                    continue
                rows.append(self._pair(rec, kind, q.get("question"), q.get("answer"),
                                       [rec["docs"][k]["chunk_id"] for k in used]))
            return rows or [self._reject(rec, "no_pairs_in_json", raw, "cross_doc")]

        return self._run(records, usage, prompt, parse)


# ---------------------------------------------------------------------------------------------------
# Cross-document groups from the corpus alone.

def in_corpus_order(chunks: pd.DataFrame) -> pd.DataFrame:
    """Chunks sorted by document id, then chunk index ("doc#3" before "doc#10")."""
    key = [(c.rsplit("#", 1)[0], int(c.rsplit("#", 1)[1]) if c.rsplit("#", 1)[-1].isdigit() else 0)
           for c in chunks["chunk_id"]]
    order = sorted(range(len(key)), key=key.__getitem__)
    return chunks.iloc[order].reset_index(drop=True)


def form_groups(chunks: pd.DataFrame, group_size: int = 3, max_groups: int = 0,
                group_by: str = "entities+bm25") -> tuple[list[dict], dict]:
    """Groups of chunks from different documents that are likely related, and a report of how.

    entities: documents sharing a rare-ish name (mentioned by 2..group_size*3 documents: a name in every
              document, like a country, relates nothing); one group per name, largest overlap first.
    bm25:     each document's top lexical neighbours (title + text as the query), for documents that no
              name group covers yet, so a corpus without shared names still gets groups.
    Every chunk id appears in groups in proportion to its relatedness; no gold labels are read.
    """
    from memo.reflections import entity_mentions

    chunks = in_corpus_order(chunks)  # Ray Data returns blocks in any order; groups must not depend on it
    first = chunks.drop_duplicates("doc_id").reset_index(drop=True)  # one chunk per document: the group's text
    docs = first.to_dict("records")
    n_docs = len(docs)
    cap = max_groups or n_docs
    groups: list[dict] = []
    seen: set[tuple] = set()
    report = Counter()
    if n_docs < 2:
        return [], {"documents": n_docs, "groups": 0, "note": "fewer than 2 documents: no cross-document groups"}

    def add(doc_idx: list[int], why: str, how: str) -> None:
        key = tuple(sorted(doc_idx))
        if len(key) < 2 or key in seen or len(groups) >= cap:
            return
        seen.add(key)
        members = [docs[i] for i in key]
        groups.append({"group_id": hashlib.sha256("|".join(m["chunk_id"] for m in members).encode()).hexdigest()[:12],
                       "how": how, "why": why, "doc_ids": [m["doc_id"] for m in members],
                       "chunk_ids": [m["chunk_id"] for m in members]})
        report[how] += 1

    index_of = {d["doc_id"]: i for i, d in enumerate(docs)}
    if "entities" in group_by:
        by_name: dict[str, set[str]] = {}
        for c in chunks.to_dict("records"):
            for m in entity_mentions(c):
                if len(m["entity"]) > 2:
                    by_name.setdefault(m["entity"], set()).add(m["doc_id"])
        shared = [(n, d) for n, d in by_name.items() if 2 <= len(d) <= max(group_size * 3, 4)]
        shared.sort(key=lambda nd: (-len(nd[1]), nd[0]))
        for name, doc_ids in shared:
            idx = sorted(index_of[d] for d in doc_ids)
            for k in range(0, len(idx), group_size):  # a name in many documents: several groups
                part = idx[k:k + group_size]
                if len(part) == 1 and k:
                    part = idx[k - 1:k + 1]
                add(part, f"they all mention {name}", "entities")
    if "bm25" in group_by:
        import bm25s

        covered = {d for g in groups for d in g["doc_ids"]}
        texts = [f"{d['title']} {d['text']}" for d in docs]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        k = min(group_size + 8, n_docs)
        order = [i for i, d in enumerate(docs) if d["doc_id"] not in covered] + \
                [i for i, d in enumerate(docs) if d["doc_id"] in covered]
        for i in order:
            res, scores = retriever.retrieve(bm25s.tokenize([texts[i]], stopwords="en", show_progress=False), k=k,
                                             show_progress=False)
            # Only real neighbours (score > 0), ties by position: group ids must be the same on every run,
            # or a resumed run would see new groups and redo finished work.
            ranked = sorted((-float(sc), int(j)) for j, sc in zip(res[0], scores[0]) if int(j) != i and sc > 0)
            idx = [j for _s, j in ranked][:group_size - 1]
            add([i] + idx, f"they share vocabulary with \"{docs[i]['title']}\"", "bm25")
    covered = {d for g in groups for d in g["doc_ids"]}
    info = {"documents": n_docs, "groups": len(groups), "by_method": dict(report), "group_size": group_size,
            "documents_in_a_group": len(covered),
            "mean_group_size": round(sum(len(g["doc_ids"]) for g in groups) / max(1, len(groups)), 2)}
    return groups, info


# ---------------------------------------------------------------------------------------------------
# Near-duplicate questions: MinHash over word 3-shingles, LSH banding, exact Jaccard to confirm.

def _shingles(text: str, n: int = 3) -> set[str]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else {""}


def near_duplicates(questions: list[str], answers: list[str] | None = None, threshold: float = 0.8,
                    num_perm: int = 64, bands: int = 16) -> list[int]:
    """Indexes to drop: each question whose shingle Jaccard with an earlier kept one is >= threshold.

    With `answers`, the answers must overlap too (word Jaccard >= 0.5): "Who was born in Lyon in 1950?"
    asked of two different people is two facts, not a duplicate.
    """
    import numpy as np

    if threshold >= 1.0 or len(questions) < 2:
        return []
    rng = np.random.default_rng(1234)
    prime = (1 << 61) - 1
    a = rng.integers(1, prime, num_perm, dtype=np.uint64)
    b = rng.integers(0, prime, num_perm, dtype=np.uint64)
    shingles = [_shingles(q) for q in questions]
    words = [set(re.sub(r"[^\w\s]", " ", x.lower()).split()) for x in answers] if answers else None
    rows = num_perm // bands
    buckets: dict[tuple, list[int]] = {}
    drop: list[int] = []

    def same(i: int, j: int) -> bool:
        if len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j]) < threshold:
            return False
        return not words or len(words[i] & words[j]) / max(1, len(words[i] | words[j])) >= 0.5

    for i, sh in enumerate(shingles):
        h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3
                      for s in sh], dtype=np.uint64)
        with np.errstate(over="ignore"):  # modular hashing: wrap-around is intended
            sig = ((np.outer(h, a) + b) % np.uint64(prime)).min(axis=0)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        if any(same(i, j) for j in {j for k in keys for j in buckets.get(k, [])}):
            drop.append(i)
            continue
        for k in keys:
            buckets.setdefault(k, []).append(i)
    return drop


# ---------------------------------------------------------------------------------------------------
# Resumable step runner.

def _read_parts(folder: Path) -> pd.DataFrame:
    frames = []
    for f in sorted(folder.glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(f))
        except Exception as e:  # noqa: BLE001 - parts are renamed into place whole, so this is outside damage
            raise MemoError(f"{f}: unreadable step output ({str(e)[:200]}); move it aside and re-run to redo "
                            "its inputs") from None
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STEP_COLUMNS)


def run_step(name: str, inputs: pd.DataFrame, folder: Path, worker_kwargs: dict, workers: int, batch_size: int,
             progress=print, num_cpus: float = 1.0) -> pd.DataFrame:
    """Run one step over `inputs` (an `input_id` column is required) with Ray Data actors; returns all its
    output rows, those of earlier runs included. Finished inputs are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data import ActorPoolStrategy

    folder.mkdir(parents=True, exist_ok=True)
    done = _read_parts(folder)
    done_ids = set(done["input_id"]) if len(done) else set()
    todo = inputs[~inputs["input_id"].isin(done_ids)].reset_index(drop=True)
    total = len(inputs)
    if todo.empty:
        progress(f"[synthesize] {name}: {total} inputs, all done in an earlier run")
        return done
    if done_ids:
        progress(f"[synthesize] {name}: resuming, {total - len(todo)}/{total} inputs done in an earlier run")
    # Object columns holding lists/dicts survive Arrow as lists/structs; JSON keeps arbitrary nesting exact.
    packed = todo.copy()
    nested = [c for c in packed.columns if packed[c].map(lambda v: isinstance(v, (list, dict))).any()]
    for c in nested:
        packed[c] = packed[c].map(json.dumps)
    # One block per batch, built on the driver (from_items puts blocks without running a task): a
    # repartition or from_pandas needs CPU tasks, and while hf actors or Serve replicas hold every CPU
    # the job would wait forever.
    blocks = max(1, -(-len(packed) // batch_size))
    ds = ray.data.from_items(packed.to_dict("records"), override_num_blocks=blocks)
    out = ds.map_batches(_Unpacked, fn_constructor_kwargs={"nested": nested, **worker_kwargs}, batch_size=batch_size,
                         batch_format="pandas", compute=ActorPoolStrategy(size=min(workers, blocks)),
                         num_cpus=num_cpus)
    t0, n_in, counts, toks = time.time(), 0, Counter(), 0
    for part, batch in enumerate(out.iter_batches(batch_format="pandas", batch_size=None)):
        if batch.empty:
            continue
        tmp = folder / f".part-{os.getpid()}-{part}.tmp"
        # Ray hands list columns over as pyarrow-backed dtypes; pandas' metadata for those does not read
        # back, so the part is written as a plain Arrow table.
        pq.write_table(pa.Table.from_pandas(batch, preserve_index=False).replace_schema_metadata(None), tmp)
        os.replace(tmp, folder / f"part-{int(time.time() * 1000)}-{os.getpid()}-{part:05d}.parquet")
        n_in += batch["input_id"].nunique()
        counts.update(batch["status"])
        toks += int(batch["completion_tokens"].sum())
        dt = time.time() - t0
        eta = (len(todo) - n_in) * dt / max(n_in, 1)
        progress(f"[synthesize] {name}: {total - len(todo) + n_in}/{total} inputs, {n_in / dt:.2f} inputs/s, "
                 f"{toks / dt:.0f} generated tok/s, {counts['ok']} pairs, {counts['reject']} rejected, "
                 f"eta {eta:.0f}s")
    return _read_parts(folder)


class _Unpacked(StepWorker):
    """StepWorker that first decodes the JSON-packed nested columns of its batch."""

    def __init__(self, nested: list[str], **kw):
        super().__init__(**kw)
        self.nested = nested

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        for c in self.nested:
            batch[c] = batch[c].map(json.loads)
        return super().__call__(batch)


# ---------------------------------------------------------------------------------------------------
# The whole LLM pipeline.

def settings_key(cfg) -> str:
    keep = {k: getattr(cfg, k) for k in ("generator", "model", "base_url", "model_source", "max_tokens", "temperature",
                                         "max_chunk_tokens", "json_retries", "verify_attempts", "chunk_words",
                                         "chunk_overlap", "consolidate_min_pairs", "group_size", "max_groups",
                                         "group_by", "domain")}
    keep["prompts"] = PROMPT_VERSION
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def run_pipeline(cfg, chunks: pd.DataFrame, out: Path, progress=print) -> dict:
    """Steps 1-5 over the chunks; returns {"pairs": DataFrame (reflection rows), "rejects": DataFrame,
    "steps": {step: {in, out, rejected, ...}}, "groups": report, "throughput": {...}}."""
    from memo.reflections import stable_id

    base = Path(out) / "steps" / settings_key(cfg)
    spec = engine_spec(cfg)
    stop_generator = None
    if cfg.generator == "vllm":
        spec = {**spec, "base_url": start_vllm_generator(cfg)}
        stop_generator = "memo-generator"
    workers = cfg.workers
    num_cpus, threads = actor_resources(spec, workers)
    common = {"engine": spec, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
              "json_retries": cfg.json_retries, "verify_attempts": cfg.verify_attempts,
              "max_chunk_tokens": cfg.max_chunk_tokens, "threads": threads}
    t0 = time.time()
    stats: dict[str, dict] = {}

    def step(name, inputs, label):
        t = time.time()
        progress(f"[synthesize] step {label}: {len(inputs)} inputs")
        res = run_step(name, inputs, base / name, {"step": name, **common}, workers, cfg.batch_size, progress,
                       num_cpus) if len(inputs) else pd.DataFrame(columns=STEP_COLUMNS)
        st = Counter(res["status"]) if len(res) else Counter()
        kinds = Counter(res[res.status == "ok"]["kind"]) if len(res) else Counter()
        stats[name] = {"in": len(inputs), "out": st["ok"], "rejected": st["reject"], "empty": st["empty"],
                       "kinds": dict(kinds),
                       "calls": int(res["calls"].sum()) if len(res) else 0,
                       "completion_tokens": int(res["completion_tokens"].sum()) if len(res) else 0,
                       "seconds": round(time.time() - t, 1)}
        return res

    chunks = in_corpus_order(chunks)
    try:
        chunk_rows = chunks.to_dict("records")
        # 1. extraction: two passes per chunk
        ext_in = pd.DataFrame([{**c, "pass": p, "input_id": f"{c['chunk_id']}|{p}"} for c in chunk_rows
                               for p in ("direct", "indirect")])
        ext = step("extract", ext_in, "1/5 extract (direct and indirect facts)")
        pairs = ext[ext.status == "ok"].copy()
        pairs["pair_id"] = [stable_id(cfg.domain, q) for q in pairs["question"]]
        pairs = pairs.drop_duplicates("pair_id")
        # 2. consolidation: documents with >= consolidate_min_pairs pairs
        doc_of = dict(zip(chunks["chunk_id"], chunks["doc_id"]))
        title_of = dict(zip(chunks["doc_id"], chunks["title"]))
        pairs["doc_id"] = [doc_of.get(ids[0], "") for ids in pairs["source_chunk_ids"]]
        con_in = []
        for doc_id, g in pairs.groupby("doc_id", sort=True):
            if len(g) >= cfg.consolidate_min_pairs:
                listing = [{"pair_id": r.pair_id, "question": r.question, "answer": r.answer,
                            "source_chunk_ids": list(r.source_chunk_ids)} for r in g.head(24).itertuples()]
                con_in.append({"input_id": f"{doc_id}|" + hashlib.sha256("".join(p["pair_id"] for p in listing)
                                                                         .encode()).hexdigest()[:10],
                               "title": title_of[doc_id], "pairs": listing,
                               "chunk_ids": sorted({c for p in listing for c in p["source_chunk_ids"]})})
        con = step("consolidate", pd.DataFrame(con_in), "2/5 consolidate (composite questions per document)")
        composites = con[con.status == "ok"]
        # 3. verification of steps 1-2, each with its source chunk for rewrites
        text_of = {c["chunk_id"]: c for c in chunk_rows}
        ver_in = []
        for r in pd.concat([pairs, composites], ignore_index=True).itertuples():
            src = text_of.get(list(r.source_chunk_ids)[0], {})
            kind = "consolidated" if r.step == "consolidate" else r.kind
            ver_in.append({"input_id": stable_id(cfg.domain, r.question) + "|" + kind, "kind": kind,
                           "question": r.question, "answer": r.answer, "source_chunk_ids": list(r.source_chunk_ids),
                           "merged_from": list(r.merged_from), "title": src.get("title", ""),
                           "doc_date": src.get("doc_date", ""),
                           "text": " ".join(text_of[c]["text"] for c in r.source_chunk_ids if c in text_of)})
        ver = step("verify", pd.DataFrame(ver_in), f"3/5 verify (judge + rewrite, up to {cfg.verify_attempts} attempts)")
        # 4. entity surfacing, per chunk
        ent = step("entity", pd.DataFrame([{**c, "input_id": c["chunk_id"]} for c in chunk_rows]),
                   "4/5 entity surfacing (describe without naming)")
        # 5. cross-document synthesis over groups formed from the corpus
        groups, group_report = form_groups(chunks, cfg.group_size, cfg.max_groups, cfg.group_by)
        progress(f"[synthesize] groups: {group_report}")
        cross_in = [{"input_id": g["group_id"], "why": g["why"], "chunk_ids": g["chunk_ids"],
                     "docs": [{k: text_of[c][k] for k in ("chunk_id", "title", "text", "doc_date")} for c in g["chunk_ids"]],
                     "text": " ".join(text_of[c]["text"] for c in g["chunk_ids"])} for g in groups]
        cross = step("cross_doc", pd.DataFrame(cross_in), "5/5 cross-document synthesis")
    finally:
        if stop_generator:
            from ray import serve

            serve.delete(stop_generator)
    # Final training set = verified pairs (1-2) + entity pairs + cross-document pairs.
    kind_to_step = {"direct": "direct", "indirect": "indirect", "consolidated": "consolidated"}
    verified = ver[ver.status == "ok"].copy()
    orig_kind = {r["input_id"]: r["kind"] for r in ver_in}
    verified["step"] = [kind_to_step.get(orig_kind.get(i, ""), "direct") for i in verified["input_id"]]
    # A rewrite changes a pair's question and so its id: point consolidated rows at the ids that ship.
    remap = {i.split("|")[0]: stable_id(cfg.domain, q) for i, q in zip(verified["input_id"], verified["question"])}
    verified["merged_from"] = [[remap.get(m, m) for m in ms] for ms in verified["merged_from"]]
    ent_ok, cross_ok = ent[ent.status == "ok"].copy(), cross[cross.status == "ok"].copy()
    ent_ok["step"], cross_ok["step"] = "entity", "cross_doc"
    # Entity and cross-document pairs are checked by rules only (the paper verifies steps 1-2).
    from memo.reflections import check_self_contained

    for df in (ent_ok, cross_ok):
        df["verified"] = [check_self_contained(q, a) is None for q, a in zip(df["question"], df["answer"])]
    good = pd.concat([verified, ent_ok, cross_ok], ignore_index=True)
    rejects = pd.concat([r[r.status == "reject"] for r in (ext, con, ver, ent, cross)], ignore_index=True)
    gen_tokens = sum(s["completion_tokens"] for s in stats.values())
    seconds = time.time() - t0
    return {"pairs": good, "rejects": rejects, "steps": stats, "groups": group_report, "step_dir": str(base),
            "throughput": {"chunks_per_s": round(len(chunks) / max(seconds, 1e-9), 3),
                           "generated_tokens_per_s": round(gen_tokens / max(seconds, 1e-9), 1),
                           "engine_calls": sum(s["calls"] for s in stats.values())}}
