"""Adding a corpus to a memory: retrain on the union vs merge (per method) vs compose at question time.

Two invented corpora of the same size (examples/demo, 12 documents about a cooperative, and
examples/orchard, 12 about an orchard trust), so no model knows either beforehand. In one run and one
MLflow registry (a fresh MEMO_HOME):
- own:     a memory per corpus (rules synthesis, `memo train`'s default recipe), the baseline;
- union:   one memory trained on both corpora's reflections (what retraining costs);
- merge:   the two own memories merged by `memo merge` (ties 0.3 and 0.7, dare_ties 0.3, task_arithmetic,
           linear): task vectors against the common root base;
- compose: both own memories asked at question time (`model: "memo/a+b"`); scored here as "either memory
           answers", an upper bound on what the executive can pick from the two replies.
Each route's memory is asked, per corpus, the corpus' check questions about one document (reworded,
never a training question) and its own memory's held-out rewordings; a reply counts when it contains the
reference or an alias (recall; the gate score beside it gives a miss its token F1). 95% bootstrap intervals
over questions; `kept` = the route's recall over the corpus' own memory's. Costs: seconds to produce each route.

    python benchmarks/bench_merging.py --out /tmp/bm        # resumable: trained memories are reused
    python benchmarks/bench_merging.py --out /tmp/bm --methods ties,linear --seed 1
    python benchmarks/bench_merging.py --out /tmp/bm3 --epochs 3     # ~50 min on 2 AVX2 cores (6 epochs: ~85)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"demo": REPO / "examples" / "demo", "orchard": REPO / "examples" / "orchard"}
METHODS = {"ties-0.3": ("ties", 0.3), "ties-0.7": ("ties", 0.7), "dare_ties-0.3": ("dare_ties", 0.3),
           "task_arithmetic": ("task_arithmetic", 1.0), "linear": ("linear", 1.0)}


def cached(path: Path, build):
    """A step's result kept as JSON in OUT, so an interrupted run goes on where it stopped."""
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    res = {**build(), "seconds": round(time.time() - t0, 1)}
    path.write_text(json.dumps(res, indent=2, default=str))
    return res


def train_domain(domain: str, reflections: list[str], out: Path, seed: int, exclude: set[str] = frozenset(),
                 epochs: int | None = None) -> dict:
    """Train (and register) a memory on the union of reflection folders, less the `exclude` questions."""
    import pandas as pd
    from memo.config import TrainConfig, build_config
    from memo.synthesis import load_reflections
    from memo.training import train

    folder = out / f"reflections-{domain}"
    folder.mkdir(exist_ok=True)
    df = pd.concat([load_reflections(r) for r in reflections], ignore_index=True)
    df[~df["question"].isin(exclude)].to_parquet(folder / "reflections.parquet")
    r = train(build_config(TrainConfig, {"domain": domain, "reflections": str(folder), "seed": seed,
                                         "eval_sample": 0, "alias": "champion", "epochs": epochs}))
    return {"version": r["version"], "model_dir": r["model_dir"], "rows": r.get("examples") or 0,
            "train_seconds": r["seconds"], "heldout_contains": r.get("heldout_contains")}


def questions_of(corpus: str, own_dir: str) -> list[dict]:
    """The corpus' one-document check questions (reworded) and its own memory's held-out rewordings."""
    qs = [json.loads(x) for x in (CORPORA[corpus] / "questions.jsonl").read_text().splitlines()]
    items = [{"question": q["question"], "answer": q["answer"], "aliases": q.get("aliases", []), "kind": "check"}
             for q in qs if q["kind"] == "single_doc"]
    held = Path(own_dir) / "heldout.jsonl"
    items += [{**json.loads(x), "kind": "heldout"} for x in held.read_text().splitlines()] if held.exists() else []
    return items


def ask_all(model_dir: str, items: list[dict]) -> list[float]:
    from memo.engines.memory import MemoryEngine
    from memo.text import item_score

    memory = MemoryEngine(model_dir)
    try:
        replies = memory.ask([x["question"] for x in items], 48)
    finally:
        memory.close()
    return [item_score(r.text, [x["answer"], *x.get("aliases", [])]) for r, x in zip(replies, items)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="every memory's epochs (default: memo train's recipe, "
                    "6 at this size); the same for every route")
    args = ap.parse_args()
    out = Path(args.out or os.environ.get("TMPDIR", "/tmp")) / ("bench_merging" if not args.out else "")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MEMO_HOME"] = str(out / "memo_home")  # its own registry: versions of this run only
    sys.path.insert(0, str(REPO / "platform"))
    from memo.config import MergeConfig, SynthesizeConfig, build_config
    from memo.evaluation.metrics import bootstrap_ci
    from memo.merging import merge
    from memo.runtime import init_ray, quiet
    from memo.synthesis import synthesize

    quiet()
    init_ray()
    refl, own = {}, {}
    for c in CORPORA:
        refl[c] = cached(out / f"synth-{c}.json", lambda c=c: {"out": synthesize(build_config(SynthesizeConfig, {
            "domain": c, "corpus": str(CORPORA[c] / "corpus.jsonl"), "out": str(out / f"synth-{c}")}))["out"]})["out"]
        own[c] = cached(out / f"train-{c}.json", lambda c=c: train_domain(c, [refl[c]], out, args.seed,
                                                                                  epochs=args.epochs))
    merged = {}
    for name in args.methods.split(","):
        method, density = METHODS[name]
        merged[name] = cached(out / f"merge-{name}.json", lambda method=method, density=density: merge(build_config(
            MergeConfig, {"domain": "merged", "inputs": [f"models:/memo-{c}/{own[c]['version']}" for c in CORPORA],
                          "method": method, "density": density, "seed": args.seed, "eval_sample": 0})))

    # the own memories' held-out rewordings are asked of every route: the union never trains on them either
    held = {x["question"] for c in CORPORA for x in questions_of(c, own[c]["model_dir"]) if x["kind"] == "heldout"}
    union = cached(out / "train-union.json", lambda: train_domain("union", list(refl.values()), out, args.seed, held,
                                                                        args.epochs))
    routes = {"own": None, "union": union["model_dir"], **{f"merge {n}": m["model_dir"] for n, m in merged.items()}}
    rows, result = [], {"seed": args.seed, "epochs": args.epochs, "corpora": {}, "costs": {}}
    for c in CORPORA:
        items = questions_of(c, own[c]["model_dir"])
        scores = {}
        for route, model_dir in routes.items():
            scores[route] = cached(out / f"score-{c}-{route.replace(' ', '_')}.json",
                                   lambda d=model_dir or own[c]["model_dir"]: {"scores": ask_all(d, items)})["scores"]
        other = [o for o in CORPORA if o != c][0]
        other_scores = cached(out / f"score-{c}-other.json", lambda: {"scores": ask_all(own[other]["model_dir"], items)})
        scores["compose (either)"] = [max(a, b) for a, b in zip(scores["own"], other_scores["scores"])]
        # recall: the reply contains the reference or an alias (1) or not (0); score: the promotion gate's
        # rule, which gives a miss its token F1 (partial credit)
        hits = {route: [float(v == 1.0) for v in s] for route, s in scores.items()}
        base = sum(hits["own"]) / len(items)
        result["corpora"][c] = {"questions": len(items), "check": sum(x["kind"] == "check" for x in items)}
        for route, s in scores.items():
            r = sum(hits[route]) / len(s)
            entry = {"recall": round(r, 3), "ci": [round(x, 3) for x in bootstrap_ci(hits[route])],
                     "score": round(sum(s) / len(s), 3), "kept": round(r / base, 2) if base else None}
            result["corpora"][c][route] = entry
            rows.append((c, route, entry))
    train_s = {c: own[c]["train_seconds"] for c in CORPORA}
    result["costs"] = {"own (each corpus)": train_s, "union retrain": union["train_seconds"],
                       **{f"merge {n}": m.get("merge_seconds") for n, m in merged.items()},
                       **{f"merge {n} (with export)": m["seconds"] for n, m in merged.items()}}
    print(f"\nrecall of each route's memory on each corpus' questions (seed {args.seed}; {out})")
    print("| corpus | route | recall [95% CI] | kept vs own | gate score |")
    print("|---|---|---|---|---|")
    for c, route, e in rows:
        print(f"| {c} | {route} | {e['recall']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] | {e['kept']} | {e['score']:.2f} |")
    print("\n| route | seconds to produce (after the own memories exist) |")
    print("|---|---|")
    print(f"| own memories (train each corpus) | {' + '.join(f'{v:.0f}' for v in train_s.values())} |")
    print(f"| union retrain | {union['train_seconds']:.0f} |")
    for n, m in merged.items():
        print(f"| merge {n} | {m.get('merge_seconds')} (merge) / {m['seconds']:.0f} (with GGUF export and registry) |")
    print("| compose | 0 (both memories served; each question asks both) |")
    best = max(merged, key=lambda n: min(result["corpora"][c][f"merge {n}"]["kept"] or 0 for c in CORPORA))
    print("RESULT " + json.dumps({
        "seed": args.seed, "epochs": args.epochs, "union_retrain_s": union["train_seconds"],
        "merge_s": {n: m.get("merge_seconds") for n, m in merged.items()},
        "kept": {f"merge {n}": {c: result["corpora"][c][f"merge {n}"]["kept"] for c in CORPORA} for n in merged},
        "union_kept": {c: result["corpora"][c]["union"]["kept"] for c in CORPORA},
        "best_merge": best}))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
