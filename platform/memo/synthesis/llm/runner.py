"""The resumable step runner: one LLM-generator step over its inputs with Ray Data actors.

Every input row has a stable `input_id`; each finished batch is written atomically to
OUT/steps/<resume key>/<step>/part-*.parquet together with the ids it consumed, so an interrupted run
resumes where it stopped and a row that failed is a reject row, not a lost one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from memo.atomic import atomic_path
from memo.errors import MemoError
from memo.synthesis.llm.rows import STEP_COLUMNS
from memo.synthesis.llm.worker import StepActor

log = logging.getLogger(__name__)


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
             num_cpus: float = 1.0) -> pd.DataFrame:
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
        log.info(f"[synthesize] {name}: {total} inputs, all done in an earlier run")
        return done
    if done_ids:
        log.info(f"[synthesize] {name}: resuming, {total - len(todo)}/{total} inputs done in an earlier run")
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
    out = ds.map_batches(StepActor, fn_constructor_kwargs={"nested": nested, **worker_kwargs}, batch_size=batch_size,
                         batch_format="pandas", compute=ActorPoolStrategy(size=min(workers, blocks)),
                         num_cpus=num_cpus)
    t0, n_in, counts, toks = time.time(), 0, Counter(), 0
    for part, batch in enumerate(out.iter_batches(batch_format="pandas", batch_size=None)):
        if batch.empty:
            continue
        # Ray hands list columns over as pyarrow-backed dtypes; pandas' metadata for those does not read
        # back, so the part is written as a plain Arrow table.
        with atomic_path(folder / f"part-{int(time.time() * 1000)}-{part:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pandas(batch, preserve_index=False).replace_schema_metadata(None), tmp)
        n_in += batch["input_id"].nunique()
        counts.update(batch["status"])
        toks += int(batch["completion_tokens"].sum())
        dt = time.time() - t0
        eta = (len(todo) - n_in) * dt / max(n_in, 1)
        log.info(f"[synthesize] {name}: {total - len(todo) + n_in}/{total} inputs, {n_in / dt:.2f} inputs/s, "
                 f"{toks / dt:.0f} generated tok/s, {counts['ok']} pairs, {counts['reject']} rejected, "
                 f"eta {eta:.0f}s")
    return _read_parts(folder)
