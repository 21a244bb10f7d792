"""Knowledge injection, lever by lever: does the memory answer new questions about its corpus?

For one benchmark sample (the corpus of its questions' paragraphs), each lever builds its own memory
with the platform's stages (rules synthesis, then `memo train` with the default recipe) and is scored
by the diagnostics `memo eval` reports: memory recall on the gold sub-questions (never trained on: the
benchmark's own wording), the share of misses that are confident wrong answers, recital of its own
training questions, and the minutes synthesis and training took. The first lever, `baseline` (today's
defaults, pinned), is measured in the same run; the table reports every lever against it.

    python benchmarks/bench_knowledge.py --limit 8 --distractors 1                       # all levers
    python benchmarks/bench_knowledge.py --limit 4 --levers baseline,phrasings --seed 1  # a quick pair

Levers (synthesize.* / train.* settings; README "Knowledge injection"):
    baseline             synthesize.phrasings=2 (every fact asked ~2 ways), train.fact_text=off
    phrasings            synthesize.phrasings=5: every fact in up to 5 wordings, both directions
    fact_text            train.fact_text=mixed: the corpus' sentences mixed into training
    phrasings+fact_text  both
    phrasings+select     phrasings=5 and train.select_on=heldout_recall: up to twice the recipe's epochs, the
                         best epoch on held-out rewordings kept, stopped 2 epochs after it
    phrasings+0.5b       phrasings=5 on the bigger memory: Qwen2.5-Coder-0.5B-Instruct (the pinned GGUF,
                         dequantized) instead of SmolLM2-135M, at the recipe's rate (1e-4 at this size)
    phrasings+0.5b-lr1e-4  the same with lr pinned at 1e-4, whatever the recipe says (RESULTS.md's 0.5B rows)
    phrasings+short      phrasings=5 and synthesize.answer_form=short_first: every answer leads with the asked
                         name, number or date, then the sentence
Each lever's result is kept in OUT/<lever>.json: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEVERS = {
    "baseline": ({"phrasings": 2}, {}),
    "phrasings": ({"phrasings": 5}, {}),
    "fact_text": ({"phrasings": 2}, {"fact_text": "mixed"}),
    "phrasings+fact_text": ({"phrasings": 5}, {"fact_text": "mixed"}),
    "phrasings+select": ({"phrasings": 5}, {"select_on": "heldout_recall"}),
    "phrasings+0.5b": ({"phrasings": 5}, {"base_model": "qwen2.5-coder-0.5b"}),
    # The rate pinned: the measurement that set the recipe's 1e-4 for this size stays reproducible.
    "phrasings+0.5b-lr1e-4": ({"phrasings": 5}, {"base_model": "qwen2.5-coder-0.5b", "lr": 1e-4}),
    "phrasings+short": ({"phrasings": 5, "answer_form": "short_first"}, {}),
}


def build_and_score(lever: str, corpus: Path, questions, out: Path, seed: int, extra_train: dict) -> dict:
    from memo.config import SynthesizeConfig, TrainConfig, build_config
    from memo.synthesis import synthesize
    from memo.training import train

    synth_set, train_set = LEVERS[lever]
    t0 = time.time()
    refl = out / f"reflections-{lever}"
    stats = synthesize(build_config(SynthesizeConfig, {"domain": "bench", "corpus": str(corpus), "out": str(refl),
                                                       **synth_set}))
    t1 = time.time()
    if train_set.get("select_on") == "heldout_recall" and "epochs" in extra_train:
        extra_train = {"max_epochs": extra_train["epochs"]}  # --epochs caps a run that chooses its epoch
    r = train(build_config(TrainConfig, {"domain": "bench", "reflections": str(refl), "register": False,
                                         "seed": seed, "eval_sample": 0, **train_set, **extra_train}))
    t2 = time.time()
    res = {"lever": lever, "reflections": stats["rows"], "model_dir": r["model_dir"], "reflections_dir": str(refl),
           "train_tokens": r.get("tokens"), "tokens_per_s": round(r.get("tokens_per_s", 0), 1),
           "synth_min": round((t1 - t0) / 60, 2), "train_min": round((t2 - t1) / 60, 2),
           "heldout_contains": r.get("heldout_contains"), "abstain_threshold": r.get("abstain_threshold"),
           "calibration_auroc": r.get("confidence_auroc"), "epochs_trained": r.get("epochs_trained"),
           "best_epoch": r.get("best_epoch"), "selection_recall": r.get("selection_recall"),
           "peak_rss_mb": r.get("peak_rss_mb"), "base_model": train_set.get("base_model", "smollm2-135m")}
    return {**res, **score(res, questions)}


def score(res: dict, questions) -> dict:
    """The diagnostics of one lever's memory (re-run alone with --rescore)."""
    from memo.evaluation.diagnostics import diagnose
    from memo.executive.clients import LocalMemory
    from memo.synthesis import load_reflections

    memory = LocalMemory(res["model_dir"])
    try:
        d = diagnose(questions, memory, load_reflections(res["reflections_dir"]))
    finally:
        memory.memory.close()
    rec, conf = d["memory_recall"], d["memory_recall"].get("confidence") or {}
    return {"recall": rec["recall"], "recall_ci": rec["recall_ci"], "probes": rec["probes"],
            "seen_verbatim": rec.get("seen_verbatim", 0), "recall_unseen": rec.get("recall_unseen", rec["recall"]),
            "recall_unseen_ci": rec.get("recall_unseen_ci"),
            "confident_wrong": rec["misses"]["wrong"], "echo": rec["misses"]["echo"], "idk": rec["misses"]["idk"],
            "recited": d["reflections_recited"]["recited"], "coverage": d.get("reflection_coverage", {}).get("coverage"),
            "probe_auroc": conf.get("auroc"), "probe_coverage": conf.get("coverage"),
            "probe_selective_accuracy": conf.get("selective_accuracy"), "rows": rec["rows"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", default="musique")
    ap.add_argument("--data", default="", help="benchmark file (default: ../shared/data/benchmarks/<name>/dev sample)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--distractors", type=int, default=1)
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    ap.add_argument("--seed", type=int, default=0, help="train.seed (shuffling, held-out split, initialisation)")
    ap.add_argument("--epochs", type=int, default=0, help="0: the recipe's default")
    ap.add_argument("--out", default="", help="results folder (default: a temporary one)")
    ap.add_argument("--rescore", action="store_true", help="re-run the diagnostics of the memories OUT already holds")
    args = ap.parse_args()
    levers = [x for x in args.levers.split(",") if x]
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        ap.error(f"--levers: unknown {', '.join(unknown)}; use {', '.join(LEVERS)}")
    if levers[0] != "baseline":
        levers = ["baseline"] + [x for x in levers if x != "baseline"]  # the baseline is measured in the same run
    out = Path(args.out or tempfile.mkdtemp(prefix="memo-bench-knowledge-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEMO_HOME", str(out / "memo-home"))
    sys.path.insert(0, str(REPO / "platform"))
    from memo.evaluation.benchmarks import load_benchmark, write_corpus
    from memo.runtime import cpu_flags, init_ray, quiet

    data = args.data or next((REPO.parent / "shared/data/benchmarks" / args.benchmark).glob("*dev*"), None)
    if not data:
        ap.error(f"--data: no dev sample for {args.benchmark} under ../shared/data/benchmarks; give --data FILE")
    docs, questions = load_benchmark(args.benchmark, data, args.limit, distractors=args.distractors)
    corpus = out / "corpus.jsonl"
    write_corpus(docs, corpus)
    quiet()
    init_ray()
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_tile"} & set(cpu_flags()))
    print(f"[bench] {args.benchmark}: {len(questions)} questions, {len(docs)} documents; seed {args.seed}; "
          f"CPU flags {' '.join(flags)}; results in {out}", flush=True)
    results = []
    for lever in levers:
        done = out / f"{lever}.json"
        if done.exists():
            res = json.loads(done.read_text())
            if args.rescore:  # the same memory, the current diagnostics
                res.update(score(res, questions))
                done.write_text(json.dumps(res, indent=2))
            results.append(res)
            continue
        extra = {"epochs": args.epochs} if args.epochs else {}
        res = build_and_score(lever, corpus, questions, out, args.seed, extra)
        done.write_text(json.dumps(res, indent=2))
        results.append(res)
        print(f"[bench] {lever}: recall {res['recall']} {res['recall_ci']}, recited {res['recited']}, "
              f"confident wrong {res['confident_wrong']}, {res['synth_min'] + res['train_min']:.1f} min", flush=True)
    base = results[0]
    print("\n| lever | reflections | recall [95% CI] | not asked verbatim in training | vs baseline | recited | "
          "confident wrong | echo | confidence AUROC | synth min | train min | train tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ci, cu = r["recall_ci"] or [None, None], r.get("recall_unseen_ci") or [None, None]
        print(f"| {r['lever']} | {r['reflections']} | {r['recall']:.2f} [{ci[0]}, {ci[1]}] | "
              f"{r['recall_unseen']:.2f} [{cu[0]}, {cu[1]}] ({r['probes'] - r['seen_verbatim']} probes) | "
              f"{r['recall_unseen'] - base['recall_unseen']:+.2f} | {r['recited']:.2f} | {r['confident_wrong']:.2f} | "
              f"{r['echo']:.2f} | {r.get('probe_auroc')} | {r['synth_min']:.1f} | {r['train_min']:.1f} | "
              f"{r['tokens_per_s']:.0f} |")
    keys = ("recall", "recall_ci", "recall_unseen", "recall_unseen_ci", "seen_verbatim", "recited", "confident_wrong",
            "echo", "idk", "probe_auroc", "probe_selective_accuracy", "probe_coverage", "abstain_threshold",
            "reflections", "synth_min", "train_min", "tokens_per_s", "best_epoch", "epochs_trained", "peak_rss_mb",
            "base_model")
    summary = {r["lever"]: {k: r.get(k) for k in keys} for r in results}
    print("RESULT " + json.dumps({"benchmark": args.benchmark, "questions": len(questions), "probes": base["probes"],
                                  "seed": args.seed, "cpu_flags": flags, "levers": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
