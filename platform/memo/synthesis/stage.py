"""The synthesize stage: corpus -> reflections (Parquet) with Ray Data, for every generator.

Chunking, the generator (rules or LLM, one interface, one typed result), dedup (exact and MinHash),
abstention rows, rejects and counts, written atomically. The output folder is content-addressed: its
default name is the resume key (corpus hash + every setting that changes the output + the generator's
code/prompt version), so a changed setting or prompt never reuses, and never overwrites, the reflections
an earlier memory version's lineage points to.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from memo.atomic import atomic_path, write_text
from memo.config import SynthesizeConfig, memo_home, resume_key
from memo.corpus import chunk_document, corpus_hash, load_documents
from memo.errors import MemoError
from memo.synthesis.abstain import abstain_rows, unknown_relation_rows
from memo.synthesis.dedup import dedup
from memo.synthesis.llm.pipeline import LLMGenerator
from memo.synthesis.paraphrase import PARAPHRASE_VERSION, paraphrase
from memo.synthesis.rules import RulesGenerator
from memo.synthesis.schema import REFLECTION_COLUMNS, STEPS, dataset_hash

log = logging.getLogger(__name__)


def make_generator(cfg: SynthesizeConfig):
    return RulesGenerator(cfg.phrasings, cfg.answer_form) if cfg.generator == "rules" else LLMGenerator(cfg)


def output_dir(cfg: SynthesizeConfig, key: str) -> Path:
    """`cfg.out`, or MEMO_HOME/reflections/<domain>/<resume key>."""
    return Path(cfg.out) if cfg.out else memo_home() / "reflections" / cfg.domain / key


def synthesize(cfg: SynthesizeConfig) -> dict:
    """Run the whole synthesis stage; returns the stats written to OUT/stats.json (with `out`).

    Re-running with the same corpus and settings reuses the finished output; an LLM run interrupted
    mid-way resumes from its per-step outputs (OUT/steps/<key>/). An OUT that holds reflections made
    from another corpus or with other settings is refused, never overwritten.
    """
    import ray

    docs = load_documents(cfg.corpus)
    chash = corpus_hash(docs)
    generator = make_generator(cfg)
    version = generator.version + (f"+{PARAPHRASE_VERSION}" if cfg.paraphrases else "")
    key = resume_key(cfg, version=version, corpus=chash)
    out = output_dir(cfg, key)
    stats_path = out / "stats.json"
    if stats_path.exists():
        old = json.loads(stats_path.read_text())
        if old.get("resume_key") == key:
            log.info(f"[synthesize] {out} already holds reflections for this corpus and config "
                     f"({old['rows']} rows); nothing to do")
            return {**old, "out": str(out)}
        raise MemoError(f"--out {out}: holds reflections made from another corpus or with other settings "
                        f"(resume key {old.get('resume_key', 'none')}, this run {key}); a trained memory's lineage "
                        "may point at them: use another --out, or omit --out for a folder named by the settings")
    t0 = time.time()
    log.info(f"[synthesize] {len(docs)} documents from {cfg.corpus}, generator={generator.name}, key {key}")
    ds = ray.data.from_items([d.__dict__ for d in docs])
    # Chunking is light: a quarter CPU lets it run beside Serve replicas that hold whole CPUs (the http
    # generator pointed at this cluster's own router) instead of waiting for one forever.
    chunks = ds.flat_map(chunk_document, fn_kwargs={"domain": cfg.domain, "chunk_words": cfg.chunk_words,
                                                    "overlap": cfg.chunk_overlap}, num_cpus=0.25).materialize()
    n_chunks = chunks.count()
    log.info(f"[synthesize] {n_chunks} chunks")
    res = generator.run(cfg, chunks, out, key)
    pairs = res.pairs
    if cfg.paraphrases:
        more, res.steps["paraphrase"] = paraphrase(pairs, cfg.domain, cfg.paraphrase_model, cfg.paraphrases,
                                                   cfg.paraphrase_max_pairs)
        pairs = pd.concat([pairs, more], ignore_index=True) if len(more) else pairs
    good, dup = dedup(pairs, cfg.near_duplicate)
    log.info(f"[synthesize] dedup: {dup['exact']} exact and {dup['near']} near-duplicate questions removed")
    abstain = abstain_rows(good, " ".join(d.text for d in docs), cfg.abstain_ratio, cfg.domain, generator.name)
    if cfg.abstain_relations:
        more = unknown_relation_rows(good, [d.text for d in docs], cfg.abstain_relations, cfg.domain, generator.name)
        abstain = pd.concat([abstain, more], ignore_index=True) if len(more) else abstain
    good = pd.concat([good, abstain], ignore_index=True)[REFLECTION_COLUMNS] if len(abstain) else good
    rejects = res.rejects.reset_index(drop=True)
    stats = {
        "domain": cfg.domain, "generator": cfg.generator, "generator_name": generator.name,
        "corpus": str(Path(cfg.corpus).resolve()), "corpus_hash": chash, "resume_key": key,
        "documents": len(docs), "chunks": n_chunks, "rows": len(good),
        "per_step": {s: int((good.step == s).sum()) for s in STEPS},
        "steps": res.steps, "groups": res.groups,
        "rejected": len(rejects), "rejected_by_reason": dict(Counter(r.split(":")[0] for r in rejects.reason)),
        "duplicates_removed": dup["exact"] + dup["near"], "duplicates": dup, "dataset_hash": dataset_hash(good),
        "seconds": round(time.time() - t0, 1), "settings": cfg.output_fields(), **res.extra,
    }
    # Every file is renamed into place whole, stats.json last: it marks completion, so a crash mid-write
    # leaves no stats.json and the next run redoes the work.
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("reflections", good), ("rejects", rejects), ("chunks", chunks.to_pandas())):
        with atomic_path(out / f"{name}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    write_text(stats_path, json.dumps(stats, indent=2))
    for name, st in res.steps.items():
        log.info(f"[synthesize] {name}: in {st['in']}, out {st['out']}, rejected {st['rejected']}")
    log.info(f"[synthesize] wrote {len(good)} reflections to {out / 'reflections.parquet'} "
             f"(per step: {stats['per_step']}; rejected {len(rejects)} -> {out / 'rejects.parquet'}; "
             f"duplicates removed {stats['duplicates_removed']}) in {stats['seconds']} s")
    return {**stats, "out": str(out)}
