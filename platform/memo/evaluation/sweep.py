"""Several evaluations read as one: the paper's noise test and the spread over trained memories.

    memo eval ... --noise 0,1 --seeds 3 --out eval/musique-sweep

`--noise 0,1` evaluates every method at each level, with the memory of that level's corpus (a noisier
corpus is a larger memory to learn, and more passages for BM25 to rank), and reports each method's F1
drop with a paired 95% bootstrap interval (the same questions at every level). The paper: MeMo loses
1.8 points, retrieval 5-6. `--seeds N` trains N memories per level from the same reflections
(train.seed, +1, ...): one training run is one draw, and the spread says how much of a difference
between two memories is luck. Only the memo_* methods depend on the memory, so the others run once.

Each evaluation is an ordinary, resumable `memo eval` run in OUT/runs/noise-<x>/seed-<k>/ (its own
results.md, predictions, traces and MLflow run); OUT/results.{json,md,png} combine them."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from memo import registry
from memo.atomic import write_text
from memo.config import EvalConfig, ExecutiveConfig
from memo.evaluation.charts import grouped_bars
from memo.evaluation.metrics import bootstrap_ci

log = logging.getLogger(__name__)
METRICS = ("em", "f1", "contains", "judge")


def level_name(level: float) -> str:
    return f"noise-{level:g}"


def run_sweep(cfg: EvalConfig, exec_cfg: ExecutiveConfig, train: dict, synth: dict, run_one) -> dict:
    out = Path(cfg.out)
    plan = [(level, k) for level in cfg.noise for k in range(cfg.seeds)
            if k == 0 or any(m.startswith("memo_") for m in cfg.methods)]
    runs = []
    for i, (level, k) in enumerate(plan, 1):
        level_dir = out / "runs" / level_name(level)
        methods = cfg.methods if k == 0 else [m for m in cfg.methods if m.startswith("memo_")]
        # one registered model per corpus: a noisier corpus is another domain, seeds are its versions
        domain = cfg.domain if not cfg.domain or len(cfg.noise) == 1 else \
            f"{cfg.domain}-noise{level:g}".replace(".", "p")[:64]
        sub = cfg.model_copy(update={"out": str(level_dir / f"seed-{k}"), "noise": [level], "seeds": 1,
                                     "methods": methods, "domain": domain})
        log.info(f"[eval] sweep {i}/{len(plan)}: noise {level:g}, seed {k} -> {sub.out}")
        # seed k > 0 trains on seed 0's reflections: the spread is the training's, not the synthesis'
        results = run_one(sub, exec_cfg, {**train, "seed": train.get("seed", 0) + k} if k else train, synth,
                          reflections=level_dir / "seed-0" / "reflections" if k else None)
        runs.append({"noise": level, "seed": k, "out": sub.out, "results": results})
    combined = combine(cfg, runs)
    write_text(out / "results.json", json.dumps(combined, indent=2))
    write_text(out / "results.md", markdown(combined))
    chart(combined, out / "results.png")
    combined["mlflow_run_id"] = _log_to_mlflow(cfg, combined, out)
    write_text(out / "results.json", json.dumps(combined, indent=2))
    log.info(markdown(combined))
    return combined


def _per_question(run_out: str, method: str, metric: str = "f1") -> dict[str, float]:
    rows = {}
    for line in (Path(run_out) / "predictions.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("method") == method:
            rows[r["qid"]] = float(r[metric])
    return rows


def combine(cfg: EvalConfig, runs: list[dict]) -> dict:
    """Per method and level: each metric's mean over seeds (with its bootstrap interval over questions
    when there is one seed, its per-seed values and sd when there are several); per method: the F1 drop
    from the first level to each other one, with a paired bootstrap interval over the questions."""
    first = runs[0]["results"]
    out = {"benchmark": cfg.benchmark, "n": first["n"], "noise": cfg.noise, "seeds": cfg.seeds, "methods": {},
           "documents": {level_name(r["noise"]): r["results"]["documents"] for r in runs if r["seed"] == 0},
           "memories": {f"{level_name(r['noise'])}/seed-{r['seed']}": r["results"].get("memory") for r in runs},
           "runs": [{"noise": r["noise"], "seed": r["seed"], "out": r["out"]} for r in runs],
           "errors": sum(r["results"].get("errors", 0) for r in runs)}
    for m in cfg.methods:
        levels = {}
        for level in cfg.noise:
            got = [r["results"]["methods"][m] for r in runs if r["noise"] == level and m in r["results"]["methods"]]
            if not got:
                continue
            entry = {"memory_calls_per_q": round(statistics.mean(g["memory_calls_per_q"] for g in got), 2),
                     "latency_s_per_q": round(statistics.mean(g["latency_s_per_q"] for g in got), 2),
                     "seeds": len(got)}
            for metric in METRICS:
                vals = [g[metric] for g in got if metric in g]
                if len(vals) != len(got):
                    continue
                entry[metric] = round(statistics.mean(vals), 4)
                if len(vals) > 1:
                    entry[f"{metric}_seeds"] = vals
                    entry[f"{metric}_sd"] = round(statistics.stdev(vals), 4)
                elif f"{metric}_ci" in got[0]:
                    entry[f"{metric}_ci"] = got[0][f"{metric}_ci"]
            levels[level_name(level)] = entry
        drops = {}
        base = next((r for r in runs if r["noise"] == cfg.noise[0] and r["seed"] == 0), None)
        for level in cfg.noise[1:]:
            other = next((r for r in runs if r["noise"] == level and r["seed"] == 0), None)
            if base is None or other is None:
                continue
            a, b = _per_question(base["out"], m), _per_question(other["out"], m)
            diffs = [b[q] - a[q] for q in a if q in b]
            if diffs:  # paired: the same question at both levels, so question difficulty cancels
                drops[level_name(level)] = {"f1_change": round(statistics.mean(diffs), 4),
                                            "f1_change_ci": bootstrap_ci(diffs), "questions": len(diffs)}
        out["methods"][m] = {"levels": levels, **({"f1_change_vs_first": drops} if drops else {})}
    recall = {}
    for r in runs:
        d = r["results"].get("diagnostics", {}).get("memory_recall")
        if d:
            recall.setdefault(level_name(r["noise"]), []).append(d["recall"])
    if recall:
        out["memory_recall"] = {lv: {"recall": round(statistics.mean(v), 4), "seeds": v,
                                     **({"sd": round(statistics.stdev(v), 4)} if len(v) > 1 else {})}
                                for lv, v in recall.items()}
    return out


def _cell(entry: dict | None, metric: str) -> str:
    if not entry or metric not in entry:
        return "-"
    v = entry[metric]
    if f"{metric}_sd" in entry:
        return f"{v:.3f} ± {entry[f'{metric}_sd']:.3f} ({entry['seeds']} seeds)"
    ci = entry.get(f"{metric}_ci")
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(c: dict) -> str:
    levels = [level_name(x) for x in c["noise"]]
    lines = [f"{c['benchmark']}: {c['n']} questions; noise levels {', '.join(f'{x:g}' for x in c['noise'])} "
             f"(documents {', '.join(str(c['documents'].get(lv, '?')) for lv in levels)}); {c['seeds']} seed(s)", ""]
    columns = ([f"F1 {lv}" for lv in levels] + [f"F1 change {levels[0]} -> {lv}" for lv in levels[1:]]
               + [f"EM {levels[0]}", f"judge {levels[0]}", "memory calls/q", "latency s/q"])
    head = "| method | " + " | ".join(columns) + " |"
    lines += ["F1 per noise level: mean [95% bootstrap interval over questions], or mean ± sd over seeds; the "
              "change is paired over the same questions (seed 0)", "", head, "|---" * (head.count("|") - 1) + "|"]
    for m, v in c["methods"].items():
        lv = v["levels"]
        cells = [_cell(lv.get(x), "f1") for x in levels]
        for x in levels[1:]:
            ch = v.get("f1_change_vs_first", {}).get(x)
            cells.append(f"{ch['f1_change']:+.3f} [{ch['f1_change_ci'][0]:+.2f}, {ch['f1_change_ci'][1]:+.2f}]"
                         if ch else "-")
        first = lv.get(levels[0], {})
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_cell(first, 'em')} | {_cell(first, 'judge')} | "
                     f"{first.get('memory_calls_per_q', 0):.1f} | {first.get('latency_s_per_q', 0):.1f} |")
    if c["seeds"] > 1:
        lines += ["", "Per seed (F1), at each noise level:", "",
                  "| method | level | " + " | ".join(f"seed {k}" for k in range(c["seeds"])) + " | mean | sd | range |",
                  "|---" * (c["seeds"] + 5) + "|"]
        for m, v in c["methods"].items():
            for x, e in v["levels"].items():
                if "f1_seeds" in e:
                    s = e["f1_seeds"]
                    lines.append(f"| {m} | {x} | " + " | ".join(f"{f:.3f}" for f in s) +
                                 f" | {e['f1']:.3f} | {e['f1_sd']:.3f} | {max(s) - min(s):.3f} |")
        for x, e in c.get("memory_recall", {}).items():
            if len(e["seeds"]) > 1:
                lines.append(f"| memory recall | {x} | " + " | ".join(f"{f:.3f}" for f in e["seeds"]) +
                             f" | {e['recall']:.3f} | {e['sd']:.3f} | {max(e['seeds']) - min(e['seeds']):.3f} |")
    if "memory_recall" in c:
        lines += ["", "memory recall on gold sub-questions: " + ", ".join(
            f"{x} {e['recall']:.3f}" for x, e in c["memory_recall"].items())]
    lines += ["", "Each run's own table: " + ", ".join(f"{r['out']}/results.md" for r in c["runs"])]
    return "\n".join(lines) + "\n"


def chart(c: dict, path: Path) -> None:
    names, levels = list(c["methods"]), [level_name(x) for x in c["noise"]]
    get = lambda lv, key: [c["methods"][n]["levels"].get(lv, {}).get(key, 0) for n in names]  # noqa: E731
    grouped_bars(path, f"{c['benchmark']} ({c['n']} questions, {c['seeds']} seed(s))", names,
                 {f"F1 {lv}": get(lv, "f1") for lv in levels}, {f"F1 {lv}": get(lv, "f1_sd") for lv in levels})


def _log_to_mlflow(cfg: EvalConfig, c: dict, out: Path) -> str:
    """One MLflow run for the sweep (its runs are logged by themselves): the combined metrics and tables."""
    from mlflow.entities import Metric

    client = registry.client()
    run = client.create_run(registry.experiment_id("memo-eval"),
                            run_name=f"{cfg.benchmark}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"memo.stage": "eval-sweep", "memo.benchmark": cfg.benchmark,
                                  "memo.noise": ",".join(f"{x:g}" for x in cfg.noise), "memo.seeds": str(cfg.seeds)})
    now = int(time.time() * 1000)
    metrics = [Metric(f"{m}.{lv}.{k}", float(val), now, 0) for m, v in c["methods"].items()
               for lv, e in v["levels"].items() for k, val in e.items() if isinstance(val, (int, float))]
    metrics += [Metric(f"{m}.f1_change.{lv}", float(d["f1_change"]), now, 0) for m, v in c["methods"].items()
                for lv, d in v.get("f1_change_vs_first", {}).items()]
    client.log_batch(run.info.run_id, metrics=metrics)
    for f in ("results.json", "results.md", "results.png"):
        client.log_artifact(run.info.run_id, str(out / f))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
