"""The Ray Train worker loop: FSDP2-sharded SFT (gloo on CPU, NCCL on GPU), resumable checkpoints
(model, optimizer, scheduler, data position) through `ray.train.report`, and the final export."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

from memo.config import Settings, TrainConfig
from memo.training.data import collate, deal, epoch_batches
from memo.training.loss import accumulation_step
from memo.training.selection import EpochSelection, selection_recall
from memo.training.sharding import build_model


class RunPlan(Settings):
    """What every worker of one run reads: the run's TrainConfig as itself, and what the driver derived from
    it (schedule, sizes, where things are). It crosses the Ray Train boundary as `model_dump()` and is
    validated again on the worker, so a missing or misspelt key is an error there, never a default."""
    train: TrainConfig
    base_path: str
    lr: float
    epochs: int
    precision: Literal["bf16", "fp32"]
    warmup_steps: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    # micro-batches per optimizer step over all workers: fixed when a run starts, kept when it is resumed on
    # another number of workers (each then accumulates micro_per_step / workers of them)
    micro_per_step: int
    lora_alpha: int
    checkpoint_every: int
    threads: int
    pad_id: int
    export_dtype: Literal["float32", "bfloat16"]
    rows_per_batch: int
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    # train.select_on=heldout_recall: the rewordings each epoch is scored on (training.selection)
    selection: list[dict] = []
    min_epochs: int = 1  # ... and the recipe's epochs, which it never stops before


def lora_config(plan: RunPlan):
    return lora_adapter(plan.train.lora_r, plan.lora_alpha, plan.train.lora_dropout)


def lora_adapter(r: int, alpha: int, dropout: float):
    from peft import LoraConfig

    # all-linear: every attention and MLP projection, not the output head (as the paper's LoRA runs).
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: FSDP2-sharded SFT with resumable checkpoints; rank 0 exports the final model.
    `config` is a RunPlan's model_dump()."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from transformers import AutoTokenizer

    plan = RunPlan.model_validate(config)
    t = plan.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(plan.threads)
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device() if t.device == "cuda" else torch.device("cpu")

    tok = AutoTokenizer.from_pretrained(plan.base_path, local_files_only=True) if plan.selection else None

    def prepare(model):
        """What changes the model's structure, applied the same on every rank (training.sharding)."""
        model.config.use_cache = False
        if t.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.finetune == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(plan))
        return model

    # One worker: a plain module. Several: FSDP2 shards (each decoder layer, then the root; on CPU,
    # prepare_model(parallel_strategy="fsdp") refuses and FSDP1 needs device_id; FSDP2 works on gloo),
    # built on the meta device and filled from rank 0's one copy of the weights.
    model = build_model(plan.base_path, device, world, prepare)
    if t.finetune == "lora" and rank == 0:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[train] LoRA r={t.lora_r}: {n_train / 1e6:.2f}M trainable parameters", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=plan.lr,
                            weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan.warmup_steps))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def snapshot() -> dict:
        """This rank's shard of the weights, copied to host memory (the best epoch so far)."""
        sd = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
        return {k: v.detach().clone() for k, v in sd.items()}

    chooser, best = EpochSelection(t.patience, min_epochs=plan.min_epochs), None
    step, epoch, skip = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            if not (Path(d) / "train_state.pt").exists():
                return  # the latest checkpoint is the exported final model: this run already finished
            meta = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
            if meta.get("micro_per_step") != plan.micro_per_step:  # the driver plans with the checkpoint's
                raise RuntimeError(f"the checkpoint was written with {meta.get('micro_per_step')} micro-batches per "
                                   f"step, this run plans {plan.micro_per_step}: the steps would differ")
            # each rank reads the slices of the shards it holds now (DCP reshards: the run that wrote them
            # may have had another number of workers)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=str(Path(d) / "shards"))
            chooser = EpochSelection(t.patience, meta.get("selection"), plan.min_epochs)
            if (Path(d) / "best").exists():
                best = {"model": snapshot()}
                dcp.load(best, checkpoint_id=str(Path(d) / "best"))
                best = best["model"]
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        sched.load_state_dict(meta["sched"])
        step, epoch, skip = meta["step"], meta["epoch"], meta["step_in_epoch"]
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {step} (epoch {epoch + 1}, batch {skip}; written by "
                  f"{meta.get('world', '?')} worker(s), read by {world})", flush=True)

    def save(step_in_epoch: int, metrics: dict, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if final:
                # the one full gather of a run: the export, written by rank 0 (no optimizer state)
                msd = get_model_state_dict(model, options=full)
                if rank == 0:
                    export_model(msd, plan, Path(d) / "model")
                    checkpoint = ray.train.Checkpoint.from_directory(d)
            else:
                # Sharded (torch.distributed.checkpoint): every rank writes its own shard of the model and the
                # optimizer, nothing is gathered on one host, and Ray Train puts every rank's files in one
                # checkpoint folder (DCP's file names are per rank). Rank 0 adds the schedule and position.
                dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=str(Path(d) / "shards"))
                if best is not None:  # the best epoch's weights, when it is not the current one
                    dcp.save({"model": best}, checkpoint_id=str(Path(d) / "best"))
                if rank == 0:
                    torch.save({"sched": sched.state_dict(), "step": step, "epoch": epoch,
                                "step_in_epoch": step_in_epoch, "world": world, "selection": chooser.history,
                                "micro_per_step": plan.micro_per_step, "mlflow_run_id": plan.mlflow_run_id},
                               Path(d) / "train_state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    mlflow_client = None
    if rank == 0 and plan.mlflow_run_id:
        import mlflow

        mlflow_client = mlflow.MlflowClient(plan.tracking_uri)
    shard = ray.train.get_dataset_shard("train")
    total, t_start, tokens_seen, loss_val = plan.total_steps, time.time(), 0, float("nan")
    first_step_s, t_steady, tokens_at_steady = 0.0, t_start, 0
    start_step = step
    autocast = plan.precision == "bf16"
    rows = None
    while epoch < plan.epochs:
        if rows is None:  # every row, on every worker (small: reflections, not a pretraining corpus)
            rows = sorted(shard.iter_rows(), key=lambda r: r["idx"])  # the read order varies; the seed's must not
        # One epoch's micro-batches, drawn anew every epoch from a seeded global shuffle (epoch_batches): the
        # same list on every worker and for any number of workers, dealt step by step (deal), so a resumed
        # run replays the same order, on any number of workers; the wordings of one fact never train in one
        # micro-batch.
        order = epoch_batches([len(r["input_ids"]) for r in rows], [list(r["facts"]) for r in rows],
                              plan.rows_per_batch, t.seed + epoch)
        for s in range(skip, plan.steps_per_epoch):
            mine, live = deal(order, s, plan.micro_per_step, rank, world)
            group = []
            for members in mine:
                pos = [rows[j]["position_ids"] for j in members] if "position_ids" in rows[0] else None
                group.append(tuple(x.to(device) for x in collate([rows[j]["input_ids"] for j in members],
                                                                 [rows[j]["labels"] for j in members], plan.pad_id,
                                                                 pos)))
            t0 = time.time()
            loss_val, n_local = accumulation_step(model, group, autocast, world, live)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tok = torch.tensor([n_local], device=device)
            if world > 1:
                dist.all_reduce(n_tok)
            tokens_seen += int(n_tok)
            if step == start_step + 1:  # warm-up (allocator, data pipeline start) is reported apart
                first_step_s, t_steady, tokens_at_steady = time.time() - t_start, time.time(), tokens_seen
            dt = time.time() - t0
            if rank == 0:
                elapsed = time.time() - t_start
                eta = elapsed / max(1, step - start_step) * (total - step)
                print(f"[train] step {step}/{total} epoch {epoch + 1}/{plan.epochs} loss {loss_val:.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {int(n_tok) / dt:.0f} tok/s eta {eta:.0f}s", flush=True)
                if mlflow_client:
                    import mlflow.entities as me

                    ts = int(time.time() * 1000)
                    mlflow_client.log_batch(plan.mlflow_run_id, metrics=[
                        me.Metric("loss", loss_val, ts, step), me.Metric("tokens_per_s", int(n_tok) / dt, ts, step),
                        me.Metric("grad_norm", float(gnorm), ts, step), me.Metric("lr", sched.get_last_lr()[0], ts, step)])
            if step % plan.checkpoint_every == 0 and step < total:
                save(s + 1, {"step": step, "loss": loss_val})
        skip = 0
        epoch += 1
        if plan.selection and len(chooser.history) < epoch:
            score = selection_recall(model, tok, plan.selection, rank, world)
            if chooser.add(score):
                best = None if epoch == plan.epochs else snapshot()  # the last epoch is the model itself
            if rank == 0:
                print(f"[train] epoch {epoch}: held-out score {score:.3f} on {len(plan.selection)} rewordings "
                      f"(best {chooser.best:.3f}, epoch {chooser.best_epoch})", flush=True)
                if mlflow_client:
                    mlflow_client.log_metric(plan.mlflow_run_id, "selection_recall", score, step=epoch)
            if chooser.stop:
                if rank == 0:
                    print(f"[train] stopping after epoch {epoch}: no better held-out score in {t.patience} "
                          f"epoch(s)", flush=True)
                break
    selected = {}
    if plan.selection:
        if chooser.best_epoch != len(chooser.history):
            set_model_state_dict(model, best)
            if rank == 0:
                print(f"[train] keeping epoch {chooser.best_epoch} (held-out score {chooser.best:.3f})", flush=True)
        selected = {"best_epoch": chooser.best_epoch, "selection_recall": chooser.best, "epochs_trained": epoch}
    seconds = time.time() - t_start
    steady = time.time() - t_steady
    # tokens_per_s: steady state, after the first optimizer step (when there is more than one);
    # first_step_s and train_seconds tell the whole story.
    tps = (tokens_seen - tokens_at_steady) / steady if step - start_step > 1 and steady > 0 else tokens_seen / max(seconds, 1e-9)
    import resource

    # rank 0's peak resident memory (the host that used to gather every checkpoint whole)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save(0, {"step": step, "loss": loss_val, "epoch": epoch, "train_seconds": seconds, "first_step_s": first_step_s,
             "tokens_per_s": tps, "tokens": tokens_seen, "peak_rss_mb": round(peak_mb), **selected}, final=True)


def export_model(state_dict: dict, plan: RunPlan, out: Path) -> None:
    """Write the trained weights as a Hugging Face folder (safetensors, tokenizer, chat template).

    LoRA runs export either merged into the base weights (a plain folder any server loads) or as the
    adapter alone (small; `memo.models.load_model` merges it onto its base at load time).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(plan.base_path, dtype=torch.float32, local_files_only=True)
    if plan.train.finetune == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(plan))
        model.load_state_dict(state_dict)
        if plan.train.lora_export == "merged":
            model = model.merge_and_unload()
    else:
        model.load_state_dict(state_dict)
    model.to(getattr(torch, plan.export_dtype))
    model.config.use_cache = True
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(plan.base_path, local_files_only=True).save_pretrained(out)
