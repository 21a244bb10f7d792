"""The train stage: reflections -> Ray Train SFT -> Hugging Face folder with lineage -> registered version."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from memo import registry
from memo.atomic import atomic_path, write_text
from memo.config import SynthesizeConfig, TrainConfig, memo_home, resume_key
from memo.engines.memory import MemoryEngine
from memo.errors import MemoError
from memo.inference import check_chat_template
from memo.models import materialize_full_model, read_manifest, resolve_base_model
from memo.runtime import interruptible
from memo.synthesis import synthesize
from memo.synthesis.schema import dataset_hash, load_reflections
from memo.training.calibration import calibrate
from memo.training.checks import heldout_check, load_eval_items, memorization_check
from memo.training.fact_text import encode_statement, load_fact_statements
from memo.training.data import (
    fact_key,
    pack_examples,
    split_heldout,
    tokenize_reflections,
    with_replay,
)
from memo.training.loop import RunPlan, train_loop_per_worker
from memo.training.placement import check_checkpoint_space, check_placement, stop_training_runs
from memo.training.resume import find_interrupted, hold, run_prefix
from memo.training.recipe import default_schedule, resolve_precision

log = logging.getLogger(__name__)
# Part of the resume key: a change to what training does with the same inputs makes a new key.
TRAIN_VERSION = "train-3"  # 2: micro-batches re-drawn every epoch, wordings of a fact apart; 3: dealt per step
# Ray Train's default (-1) retries a worker group that cannot start forever: once more, then fail.
CONTROLLER_FAILURE_LIMIT = 1


def count_params(base_path: str) -> int:
    """Parameter count without loading weights (meta device), to pick defaults before any worker starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path, local_files_only=True))
    return sum(p.numel() for p in m.parameters())


def export_gguf(out: Path) -> str:
    """Every version also carries model.gguf (f16, llama.cpp's converter) for the CPU engine; a model the
    converter cannot take (e.g. an unknown tokenizer) still registers and serves on transformers."""
    from memo import gguf
    from memo.engines.memory import memory_gguf

    if not (gguf.llamacpp_dir() / "convert_hf_to_gguf.py").is_file():
        return "skipped: llama.cpp's converter is not installed"
    t0 = time.time()
    try:
        path = memory_gguf(out)
    except MemoError as e:
        log.warning(f"[train] no GGUF for this version: {e}")
        return f"failed: {e}"
    log.info(f"[train] GGUF for llama.cpp: {path} ({path.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.0f} s)")
    return "model.gguf (f16)"


def build_memory(cfg: TrainConfig, synth: SynthesizeConfig | None = None) -> dict:
    """The platform job: with `cfg.corpus`, synthesize it first (into the content-addressed folder `synth`
    names), then train on the reflections; returns the train result with per-stage timings."""
    t0 = time.time()
    timings = {}
    if cfg.corpus:
        synth = synth or SynthesizeConfig(domain=cfg.domain, corpus=cfg.corpus)
        stats = synthesize(synth)
        cfg = cfg.model_copy(update={"reflections": stats["out"], "corpus": ""})
        timings["synthesize_s"] = round(time.time() - t0, 1)
    result = train(cfg)
    timings["train_s"] = result["seconds"]
    return {**result, "timings": timings}


def train(cfg: TrainConfig) -> dict:
    """The train stage: reflections -> Ray Train SFT -> HF folder with lineage -> registered version.

    Everything that can be wrong with the input is checked before a worker starts.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    t0 = time.time()
    if cfg.corpus:
        raise MemoError("train() takes reflections; use build_memory() to synthesize a corpus first")
    # Missing, malformed or empty: fail before anything is trained.
    eval_items = load_eval_items([cfg.eval_questions]) if cfg.eval_questions else []
    df = load_reflections(cfg.reflections)
    new_rows = len(df)
    sources = [str(Path(cfg.reflections).resolve())]
    parent_version, base_model, replay = None, cfg.base_model, 0
    if cfg.parent:
        # Continual update: the current version (e.g. champion) is the base, and a replay share of the
        # reflections it was trained on keeps old facts from being overwritten by the new ones.
        parent_version = cfg.parent if cfg.parent.isdigit() else registry.resolve_version(cfg.domain, cfg.parent)
        parent_dir = registry.download_version(cfg.domain, parent_version)
        base_path = str(materialize_full_model(parent_dir))
        base_model = f"models:/{registry.registered_name(cfg.domain)}/{parent_version}"
        held = parent_dir / "heldout.jsonl"
        exclude = {json.loads(x)["question"] for x in held.read_text().splitlines()} if held.exists() else set()
        df, replay, old_sources = with_replay(df, read_manifest(parent_dir), cfg.replay_ratio, cfg.seed, exclude)
        sources += [s for s in old_sources if s not in sources]
        log.info(f"[train] continual update of {base_model} ({cfg.parent}): {new_rows} new reflections "
                 f"+ {replay} replayed")
    else:
        base_path = resolve_base_model(cfg.base_model)
    data_hash, data_rows = dataset_hash(df), len(df)  # the input dataset, as the synthesize stage hashed it
    dataset_df = df
    df, heldout = split_heldout(df, cfg.holdout_ratio, cfg.seed)
    selection = pd.DataFrame(columns=["question", "answer"])
    if cfg.select_on == "heldout_recall":
        # its own split (same rule: one wording per fact whose other wordings stay in training), so the
        # gate's held-out number is not the one the epoch was chosen on
        # at least 8 questions where the reflections allow (a handful scores in coarse steps), at most 20%
        df, selection = split_heldout(df, min(0.2, max(cfg.select_ratio, 8 / max(len(df), 1))), cfg.seed + 1)
        if selection.empty:
            raise MemoError(f"select_on=heldout_recall: --reflections {cfg.reflections} has no fact asked in two or "
                            "more direct/indirect wordings to hold one out; raise synthesize.phrasings, or use "
                            "select_on=last")
    tok = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    check_chat_template(tok, f"--base-model {cfg.base_model}")
    data, dropped = tokenize_reflections(df, tok, cfg.max_seq_len)
    if data.empty:
        raise MemoError(f"--reflections {cfg.reflections}: every example is longer than max_seq_len={cfg.max_seq_len}")
    statements = 0
    if cfg.fact_text == "mixed":
        enc = [(encode_statement(tok, s), fact_key(s)) for s in load_fact_statements(cfg.reflections)]
        enc = [(e, k) for e, k in enc if len(e[0]) <= cfg.max_seq_len]
        statements = len(enc)
        data = pd.concat([data, pd.DataFrame({"input_ids": [e[0] for e, _ in enc], "labels": [e[1] for e, _ in enc],
                                              "facts": [[k] for _, k in enc]})], ignore_index=True)
    if len(data) < cfg.workers:
        raise MemoError(f"--workers {cfg.workers}: more workers than training examples ({len(data)})")
    n_params = count_params(base_path)
    epochs, lr, why = default_schedule(n_params, len(data), cfg.recipe, cfg.finetune)
    epochs, lr = cfg.epochs or epochs, cfg.lr or lr
    recipe_epochs = epochs
    if cfg.select_on == "heldout_recall":
        # the most it may train: it stops earlier when the selection score stops improving, never before
        # the recipe's own epochs
        epochs = cfg.max_epochs or 2 * epochs
    rows_per_batch = cfg.batch_size
    if cfg.packing:
        # About batch_size examples per micro-batch either way, so packing changes throughput, not the
        # optimisation: fewer, fuller rows instead of many padded short ones.
        n_examples = len(data)
        data = pack_examples(data, cfg.max_seq_len)
        rows_per_batch = max(1, round(cfg.batch_size * len(data) / n_examples))
        if len(data) < cfg.workers:
            raise MemoError(f"packing=true leaves {len(data)} row(s) for {cfg.workers} workers; turn packing off")
        log.info(f"[train] packing: {n_examples} examples in {len(data)} rows of <= {cfg.max_seq_len} tokens, "
                 f"{rows_per_batch} rows per micro-batch")
    # Every worker reads every row and draws the epoch's micro-batches from the same seeded shuffle
    # (training.data.epoch_batches); an optimizer step trains micro_per_step of them over all workers.
    data = data.assign(idx=range(len(data)))
    # Before anything is written: a cluster that cannot place the workers is an error now, not a silent wait.
    use_gpu = cfg.device == "cuda"
    check_placement(cfg.workers, use_gpu, cfg.startup_timeout_s, cfg.autoscaling)
    storage = memo_home() / "ray_results"
    check_checkpoint_space(n_params, cfg.finetune, storage)
    key = resume_key(cfg, version=TRAIN_VERSION, reflections=data_hash, base=base_model)
    interrupted = find_interrupted(storage, run_prefix(cfg.domain, key), cfg.workers) if cfg.resume else None
    if interrupted:
        micro_per_step, accum = interrupted.micro_per_step, interrupted.accum
    else:
        accum = max(1, cfg.effective_batch_size // (cfg.batch_size * cfg.workers)) if cfg.effective_batch_size else 1
        micro_per_step = accum * cfg.workers
    opt_steps_per_epoch = math.ceil(math.ceil(len(data) / rows_per_batch) / micro_per_step)
    total = opt_steps_per_epoch * epochs
    precision = resolve_precision(cfg.precision, cfg.device)
    export_dtype = cfg.export_dtype if cfg.export_dtype != "auto" else ("bfloat16" if precision == "bf16" else "float32")
    stats_file = Path(cfg.reflections) / "stats.json" if Path(cfg.reflections).is_dir() else None
    synth = json.loads(stats_file.read_text()) if stats_file and stats_file.exists() else {}
    log.info(f"[train] {len(data)} examples ({dropped} over {cfg.max_seq_len} tokens dropped, "
             + (f"{statements} fact statements mixed in, " if cfg.fact_text == "mixed" else "")
             + f"{len(heldout)} paraphrases held out for evaluation"
             + (f", {len(selection)} to choose the epoch on" if len(selection) else "") + "), "
             f"{n_params / 1e6:.1f}M params, {cfg.finetune}, {cfg.workers} worker(s), "
             f"{'at most ' if len(selection) else ''}{epochs} epochs x "
             f"{opt_steps_per_epoch} steps = {total} steps of {micro_per_step * rows_per_batch} rows"
             f"{f' ({accum} accumulated micro-batches)' if accum > 1 else ''}, lr {lr:g}, {precision}"
             + ("" if cfg.epochs and cfg.lr else f" ({why})"))

    params = {**cfg.model_dump(), "resume_key": key, "epochs": epochs, "lr": lr, "precision": precision, "base_path": base_path,
              "examples": len(data), "dropped_too_long": dropped, "total_steps": total, "n_params": n_params,
              "accumulation": accum, "export_dtype": export_dtype, "replay_rows": replay,
              "fact_statements": statements}
    run_id = registry.start_run(cfg.domain, "train", params)
    if interrupted:  # its first steps' metrics are in the attempt that wrote the checkpoint
        registry.client().set_tag(run_id, "memo.continues_run", interrupted.mlflow_run_id)
        registry.client().set_tag(run_id, "memo.resumed_from_step", str(interrupted.step))
    registry.log_reflections_input(run_id, dataset_df, cfg.reflections, data_hash, cfg.domain, synth)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = cfg.cpus_per_worker or max(1, cpus // cfg.workers)
    plan = RunPlan(
        # eval_questions is read here, on the driver; cleared so the worker's validation never looks for
        # a file that lives on another node
        train=cfg.model_copy(update={"eval_questions": ""}), base_path=base_path, lr=lr, epochs=epochs,
        precision=precision, warmup_steps=int(cfg.warmup_ratio * total), steps_per_epoch=opt_steps_per_epoch,
        total_steps=total, micro_per_step=micro_per_step, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
        # A full checkpoint of a 135M model with AdamW state is ~1.6 GB written twice (worker, then
        # storage): ~15 s on this CPU, so by default only ~3 per run, at epoch boundaries.
        checkpoint_every=cfg.checkpoint_every or opt_steps_per_epoch * max(1, math.ceil(epochs / 3)),
        threads=threads, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        export_dtype=export_dtype, rows_per_batch=rows_per_batch, mlflow_run_id=run_id,
        tracking_uri=registry.tracking_uri(),
        selection=selection[["question", "answer"]].to_dict("records"), min_epochs=min(recipe_epochs, epochs))
    if interrupted:
        name, lock = interrupted.name, interrupted.lock
        log.info(f"[train] continuing the interrupted run {name} from its checkpoint at step {interrupted.step} "
                 f"(written by {interrupted.world} worker(s); now {cfg.workers} worker(s) x {accum} micro-batch(es) "
                 f"per step; --set train.resume=false starts over)")
    else:
        name = f"{run_prefix(cfg.domain, key)}-{run_id[:8]}"
        lock = hold(storage / name)
    # Bounds on what is left after the check (someone takes the resources before Ray Train places its
    # workers): each worker-group start waits startup_timeout_s, and one failed start is retried once.
    # Ray Train reads this from the driver's environment and passes it to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.startup_timeout_s)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=plan.model_dump(),
        # 1 logical CPU per worker leaves room for Ray Data's streaming split; the worker itself runs
        # `threads` torch threads (Ray Train would otherwise pin it to 1).
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1}),  # as placement.worker_bundle
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        # every worker reads every row (training.loop deals the micro-batches), whatever their number
        datasets={"train": ray.data.from_pandas(data)}, dataset_config=DataConfig(datasets_to_split=[]),
    )
    # Interrupted (Ctrl-C, SIGTERM, a time limit), the run's controller is stopped: it would otherwise go
    # on and keep its workers' CPUs. fit() runs in a thread so that the interruption reaches us at all.
    try:
        result = interruptible(trainer.fit, stop_training_runs)
        stop_training_runs(interrupted=False)  # the finished run's controller process
        if result.error:
            raise result.error
    except BaseException as e:  # the MLflow run says what ended it; the checkpoints stay for a resume
        registry.fail_run(run_id, f"{type(e).__name__}: {e}", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if lock:
            lock.close()
    out = memo_home() / "memories" / cfg.domain / run_id
    with result.checkpoint.as_directory() as d, atomic_path(out) as tmp:
        shutil.copytree(Path(d) / "model", tmp)
    if (out / "adapter_config.json").exists():
        # The adapter's base must resolve wherever the version is served, not only on this machine:
        # the base model spec for a fresh run, the parent's registry URI for a continual update.
        ac = json.loads((out / "adapter_config.json").read_text())
        ac["base_model_name_or_path"] = base_model
        (out / "adapter_config.json").write_text(json.dumps(ac, indent=2))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    train_seconds = time.time() - t0
    log.info(f"[train] trained in {metrics.get('train_seconds', 0):.0f} s "
             f"({metrics.get('tokens_per_s', 0):.0f} tok/s), final loss {metrics.get('loss', float('nan')):.4f}")

    gguf_note = export_gguf(out)
    # One load of the trained memory for every post-training question (a llama-server start or a model load).
    memory = MemoryEngine(out) if cfg.eval_sample > 0 or len(heldout) or eval_items else None
    try:
        check = memorization_check(memory, df, cfg.eval_sample) if memory else {}
        if len(heldout):
            rows = heldout[["question", "answer"]].to_dict("records")
            (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            check.update(heldout_check(memory, rows, "heldout paraphrases"))
            # the abstention threshold, from the same held-out rewordings (training.calibration)
            check.update(calibrate(memory, rows, " ".join(df["answer"])))
        if eval_items:
            check.update(heldout_check(memory, eval_items, "questions from eval_questions"))
    finally:
        if memory:
            memory.close()
    manifest = {
        "domain": cfg.domain, "base_model": base_model, "base_path": base_path,
        "root_base_model": read_manifest(base_path).get("root_base_model", cfg.base_model),
        "corpus_hash": synth.get("corpus_hash", ""), "reflections": sources[0], "reflection_sources": sources,
        "reflections_hash": data_hash, "reflection_rows": data_rows, "new_rows": new_rows, "replay_rows": replay,
        "heldout_rows": len(heldout), "selection_rows": len(selection),
        "generator": synth.get("generator", ""), "finetune": cfg.finetune,
        "lora_export": cfg.lora_export if cfg.finetune == "lora" else None,
        "parent_version": parent_version, "run_id": run_id, "resume_key": key, "ray_run": name,
        "resumed_from_step": interrupted.step if interrupted else 0, "gguf": gguf_note, "training_config": params, "metrics": {**metrics, **check},
    }
    write_text(out / "memo_manifest.json", json.dumps(manifest, indent=2, default=str))
    from mlflow.entities import Metric

    c = registry.client()
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(f"final_{k}", float(v), ts, 0) for k, v in {**metrics, **check}.items()
                                 if v is not None])
    version = None
    if cfg.register:
        lineage = {k: manifest[k] for k in ("base_model", "corpus_hash", "reflections_hash", "reflection_rows",
                                            "generator", "parent_version", "finetune", "replay_rows", "resume_key")}
        lineage.update(train_recall=check.get("train_recall"), epochs=epochs, lr=lr)
        if check.get("abstain_threshold") is not None:
            lineage["abstain_threshold"] = check["abstain_threshold"]
        version = registry.register_memory(cfg.domain, out, run_id, lineage, cfg.alias)
        log.info(f"[train] registered {registry.registered_name(cfg.domain)} version {version} "
                 f"with alias {cfg.alias!r}")
    registry.end_run(run_id)
    return {"run_id": run_id, "model_dir": str(out), "version": version, "alias": cfg.alias if version else None,
            "ray_run": name, "resumed_from_step": interrupted.step if interrupted else 0, "seconds": round(train_seconds, 1), **metrics, **check}
