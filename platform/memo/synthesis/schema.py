"""The reflection schema every generator writes, and the one typed result they all return.

A reflection row is the contract between synthesis and training (see ARCHITECTURE: id, domain, step,
question, answer, source_chunk_ids, generator, verified) plus `merged_from`, the ids of the pairs a
consolidated row merges. Rejects carry the step, the reason and the raw reply.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memo.errors import MemoError

STEPS = ("direct", "indirect", "consolidated", "entity", "cross_doc", "abstain")
COLUMNS = ["id", "domain", "step", "question", "answer", "source_chunk_ids", "generator", "verified"]
REFLECTION_COLUMNS = COLUMNS + ["merged_from"]
REJECT_COLUMNS = ["domain", "step", "input_id", "question", "answer", "source_chunk_ids", "generator", "reason", "raw"]


def stable_id(domain: str, question: str) -> str:
    """Stable row id: same domain + normalised question -> same id, so re-runs and dedup agree."""
    norm = re.sub(r"\W+", " ", question.lower()).strip()
    return hashlib.sha256(f"{domain}\x00{norm}".encode()).hexdigest()[:16]


def _lists(values) -> list[list]:
    # Parquet hands lists back as numpy arrays, pandas fills missing ones with NaN: one shape for both.
    return [list(v) if v is not None and not isinstance(v, float) else [] for v in values]


def reflection_frame(rows: pd.DataFrame | list[dict], domain: str, generator: str) -> pd.DataFrame:
    """Reflection rows in the contract's columns and types; ids from (domain, question)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=REFLECTION_COLUMNS)
    return pd.DataFrame({
        "id": [stable_id(domain, q) for q in df["question"]], "domain": domain, "step": df["step"].values,
        "question": df["question"].values, "answer": df["answer"].values,
        "source_chunk_ids": _lists(df["source_chunk_ids"]), "generator": generator,
        "verified": df["verified"].astype(bool).values if "verified" in df else True,
        "merged_from": _lists(df["merged_from"]) if "merged_from" in df else [[] for _ in range(len(df))],
    }, columns=REFLECTION_COLUMNS)


def reject_frame(rows: pd.DataFrame | list[dict], domain: str, generator: str) -> pd.DataFrame:
    """Rejected pairs in one schema, whichever generator or step set them aside."""
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=REJECT_COLUMNS)
    get = lambda c: df[c].values if c in df else [""] * len(df)  # noqa: E731
    return pd.DataFrame({"domain": domain, "step": df["step"].values, "input_id": get("input_id"),
                         "question": get("question"), "answer": get("answer"),
                         "source_chunk_ids": _lists(df["source_chunk_ids"]), "generator": generator,
                         "reason": df["reason"].values, "raw": get("raw")}, columns=REJECT_COLUMNS)


@dataclass
class GeneratorOutput:
    """What every generator returns: the pairs, the rejects with reasons, and a report (per-step counts,
    how cross-document groups formed, anything else worth putting in stats.json)."""
    pairs: pd.DataFrame
    rejects: pd.DataFrame
    steps: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def dataset_hash(df: pd.DataFrame) -> str:
    """Content hash of a reflections table (ids, questions, answers): the lineage of a trained memory."""
    h = hashlib.sha256()
    for rid, q, a in sorted(zip(df["id"], df["question"], df["answer"])):
        h.update(f"{rid}\x00{q}\x00{a}\x01".encode())
    return h.hexdigest()


def load_reflections(path: str | Path) -> pd.DataFrame:
    """Read a reflections folder or Parquet file and check it against the contract, naming what is wrong."""
    p = Path(path)
    f = p / "reflections.parquet" if p.is_dir() else p
    if not f.exists():
        raise MemoError(f"--reflections {p}: no reflections.parquet here; run `memo synthesize` first")
    try:
        df = pd.read_parquet(f)
    except Exception as e:
        raise MemoError(f"{f}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("question", "answer", "step") if c not in df.columns]
    if missing:
        raise MemoError(f"{f}: missing column(s) {', '.join(missing)}; expected the reflection columns {', '.join(COLUMNS)}")
    if df.empty:
        raise MemoError(f"{f}: no reflections (0 rows); check the synthesize stage's stats.json")
    return df
