"""`memo eval`: every method on every question of a benchmark sample, scored, written to OUT, logged to
MLflow. Per-question rows are appended as they finish, so an interrupted run picks up where it stopped
(same resume key) instead of paying for every answer again."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from memo import registry
from memo.atomic import write_text
from memo.config import (
    EvalConfig,
    ExecutiveConfig,
    SynthesizeConfig,
    TrainConfig,
    field_extra,
    resume_key,
)
from memo.corpus import Document, corpus_hash
from memo.errors import MemoError
from memo.evaluation.baselines import (
    BM25Index,
    expanded_search,
    gold_decomposition,
    passages_of,
    read_passages,
)
from memo.evaluation.benchmarks import Question, load_benchmark, write_corpus
from memo.evaluation.charts import grouped_bars
from memo.evaluation.metrics import bootstrap_ci, judge_correct
from memo.executive import answer_question, closed_book
from memo.executive.clients import (
    HttpMemory,
    LocalLLM,
    LocalMemory,
    OpenAILLM,
    load_memory,
    make_executive,
)
from memo.executive.single import CLOSED_BOOK
from memo.executive.trace import usage_of
from memo.models import materialize_full_model
from memo.text import contains_reference, exact_match, f1, is_idk

log = logging.getLogger(__name__)
EVAL_VERSION = "eval-1"  # part of the resume key: a scoring or protocol change starts a new OUT


def _settings(cfg: EvalConfig, exec_cfg: ExecutiveConfig, train: dict, synth: dict) -> dict:
    """What an answer depends on: a resumed run must not mix answers made under other settings. One run
    has one noise level (and one memory), so its settings name the level, not the sweep."""
    fields = {k: v for k, v in cfg.output_fields().items() if k != "seeds"}
    # how a stage runs (workers, batch sizes) is not what it writes: a resumed run may change it
    outputs = lambda cls, given: {k: v for k, v in given.items() if not field_extra(cls, k).get("run_only")}  # noqa: E731
    return {"eval": {**fields, "noise": cfg.noise[0]}, "executive": exec_cfg.output_fields(),
            "train": outputs(TrainConfig, train), "synthesize": outputs(SynthesizeConfig, synth)}


def _open_run(cfg: EvalConfig, settings: dict, out: Path) -> dict[tuple[str, str], dict]:
    """Rows already done in OUT for these settings; an OUT written with other settings is refused."""
    settings_file = out / "settings.json"
    key = resume_key(version=EVAL_VERSION, settings=settings)
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        if before.get("resume_key") != key:
            old = before.get("settings", {})
            diff = ", ".join(f"{section}.{k}" for section, vals in settings.items() for k in vals
                             if old.get(section, {}).get(k) != vals[k]) or "the code version"
            raise MemoError(f"--out {out}: holds a run with other settings ({diff}); use another --out or delete it")
    write_text(settings_file, json.dumps({"resume_key": key, "settings": settings}, indent=2, default=str))
    done = {}
    pred = out / "predictions.jsonl"
    if pred.exists():
        for line in pred.read_text().splitlines():
            try:
                row = json.loads(line)
                if not row.get("error"):  # a failed answer (a timeout, a dead engine) is asked again
                    done[(row["method"], row["qid"])] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that question is simply redone
    return done


def _memory_client(cfg: EvalConfig, docs: list[Document], out: Path, exec_cfg: ExecutiveConfig, train: dict,
                   synth: dict, reflections: Path | None = None):
    """The memory the memo_* methods question: a router, a registered/local model, or one built here
    (once: OUT/memory.json names it, so a resumed run questions the same memory instead of retraining)."""
    from memo.runtime import init_ray
    from memo.training import build_memory

    if cfg.memory_url:
        return HttpMemory(cfg.memory_url, cfg.domain, os.environ.get("MEMO_API_KEY"), exec_cfg.memory_max_tokens,
                          exec_cfg.memory_temperature, exec_cfg.confidence_gate), f"{cfg.memory_url} ({cfg.domain})"
    if cfg.memory:
        mem = load_memory(cfg.memory, exec_cfg.memory_max_tokens, exec_cfg.memory_temperature,
                          exec_cfg.confidence_gate)
        return mem, mem.version
    built = out / "memory.json"
    if built.exists():  # built by an earlier, interrupted run of this same evaluation
        spec = json.loads(built.read_text())
        mem = LocalMemory(spec["memory"], exec_cfg.memory_max_tokens, exec_cfg.memory_temperature,
                          confidence_gate=exec_cfg.confidence_gate)
        mem.version = spec["label"]
        return mem, spec["label"]
    # No memory given: build one for this corpus with the platform's own stages.
    corpus = out / "corpus.jsonl"
    write_corpus(docs, corpus)
    domain = cfg.domain or f"{cfg.benchmark}-{corpus_hash(docs)[:8]}"
    log.info(f"[eval] building the memory for {len(docs)} documents as memo-{domain} (synthesize + train)")
    init_ray()
    # `reflections`: another seed's folder for this corpus; synthesis sees its resume key and skips
    synth_cfg = SynthesizeConfig(**{**synth, "domain": domain, "corpus": str(corpus),
                                    "out": str(reflections or out / "reflections")})
    result = build_memory(TrainConfig(**{**train, "domain": domain, "corpus": str(corpus)}), synth_cfg)
    model = str(materialize_full_model(Path(result["model_dir"])))
    label = f"models:/{registry.registered_name(domain)}/{result['version']}" if result.get("version") else model
    write_text(built, json.dumps({"memory": model, "label": label, "run_id": result["run_id"]}))
    mem = LocalMemory(model, exec_cfg.memory_max_tokens, exec_cfg.memory_temperature,
                      confidence_gate=exec_cfg.confidence_gate)
    mem.version = label
    return mem, label


def _judge(cfg: EvalConfig, executive):
    """The paper's binary correctness judge: an endpoint, else a local model (by default the executive's
    own engine, so no second model is loaded); '' turns it off."""
    if cfg.judge_url:
        return OpenAILLM(cfg.judge_url, cfg.judge_model, os.environ.get("MEMO_JUDGE_API_KEY"))
    if not cfg.judge_local:
        return None
    if cfg.judge_local == "auto" and not cfg.executive_url:
        return executive
    return LocalLLM(cfg.judge_local)


def _answer(method: str, q: Question, ctx: dict) -> tuple[str, dict]:
    executive, cfg = ctx["executive"], ctx["cfg"]
    if method == "closed_book":
        out = closed_book(q.question, executive, cfg.reader_max_tokens)
        return out.strip(), {"prompt": CLOSED_BOOK.format(q=q.question), "output": out}
    if method == "bm25":
        return read_passages(q.question, ctx["bm25"].search(q.question, cfg.bm25_k), executive, cfg.reader_max_tokens)
    if method == "oracle":
        gold = [ctx["docs"][d] for d in q.gold_doc_ids if d in ctx["docs"]]
        passages = [{"doc_id": d.doc_id, "title": d.title, "text": d.text} for d in gold]
        return read_passages(q.question, passages, executive, cfg.reader_max_tokens)
    if method == "memo_gold_decomp":
        return gold_decomposition(q, ctx["memory"])
    if method == "memo_rag":  # parametric + text retrieval: the memory's answers and BM25's passages, one reader
        tr = answer_question(q.question, executive, ctx["memory"], ctx["exec_cfg"].model_copy(update={"protocol": "single"}))
        facts = list(dict.fromkeys(s["answer"] for s in tr.steps if s["role"] == "memory" and not is_idk(s["answer"])))
        passages = (expanded_search(ctx["bm25"], q.question, facts, cfg.bm25_k) if cfg.rag_query == "expand"
                    else ctx["bm25"].search(q.question, cfg.bm25_k))
        answer, read = read_passages(q.question, passages, executive, cfg.reader_max_tokens, facts)
        return answer, {**asdict(tr), "answer": answer, "read": read, "memory_calls": tr.memory_calls}
    exec_cfg = ctx["exec_cfg"].model_copy(update={"protocol": "structured" if method == "memo_structured" else "single"})
    tr = answer_question(q.question, executive, ctx["memory"], exec_cfg)
    return tr.answer, asdict(tr)


def _gold_passages_read(trace: dict, q: Question) -> float | None:
    """For the methods that read passages (bm25, oracle, memo_rag): the share of the question's gold
    paragraphs among them, so a user sees whether retrieval or the reader lost an answer."""
    passages = trace.get("passages") or (trace.get("read") or {}).get("passages")
    if passages is None or not q.gold_doc_ids:
        return None
    read = {p.rsplit("#", 1)[0] for p in passages}  # a chunk id is <doc_id>#<index>
    return round(sum(d in read for d in q.gold_doc_ids) / len(q.gold_doc_ids), 4)


def summarize(rows: list[dict], methods: list[str], benchmark: str, n: int) -> dict:
    out = {"benchmark": benchmark, "n": n, "methods": {}}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        k = len(rs)
        entry = {"em": round(sum(r["em"] for r in rs) / k, 4), "f1": round(sum(r["f1"] for r in rs) / k, 4),
                 "contains": round(sum(r["contains"] for r in rs) / k, 4),
                 "memory_calls_per_q": round(sum(r["memory_calls"] for r in rs) / k, 2),
                 "latency_s_per_q": round(sum(r["latency_s"] for r in rs) / k, 2),
                 "executive_tokens_per_q": round(sum(r["executive_tokens"] for r in rs) / k, 1), "n": k,
                 "json_turns": sum(r.get("json_turns", 0) for r in rs),
                 "json_parse_failures": sum(r.get("json_failed", 0) for r in rs)}
        for phase, tokens, ms in (("prefill", "executive_prefill_tokens", "executive_prefill_ms"),
                                  ("decode", "executive_completion_tokens", "executive_decode_ms")):
            total_ms = sum(r.get(ms, 0) for r in rs)
            if total_ms:  # only engines that report timings
                entry[f"executive_{phase}_tok_s"] = round(sum(r.get(tokens, 0) for r in rs) / total_ms * 1000, 1)
        gold_read = [r["gold_passages_read"] for r in rs if r.get("gold_passages_read") is not None]
        if gold_read:
            entry["gold_passages_read"] = round(sum(gold_read) / len(gold_read), 4)
        if all(r.get("judge") is not None for r in rs):
            entry["judge"] = round(sum(r["judge"] for r in rs) / k, 4)
            # how far to trust the judge: the share of answers where it agrees with `contains`
            entry["judge_agrees_with_contains"] = round(sum(r["judge"] == r["contains"] for r in rs) / k, 4)
        for metric in ("em", "f1", "contains", "judge"):  # 95% bootstrap intervals over questions
            if metric in entry:
                entry[f"{metric}_ci"] = bootstrap_ci([r[metric] for r in rs])
        out["methods"][m] = entry
    return out


def markdown_table(results: dict) -> str:
    """The results table; each score with its 95% bootstrap interval over questions."""
    has_judge = any("judge" in v for v in results["methods"].values())
    head = "| method | EM | F1 | contains |" + (" judge |" if has_judge else "") + \
        " memory calls/q | latency s/q | executive tokens/q | JSON fails/turns | executive prefill/decode tok/s |"
    lines = [f"{results['benchmark']}: {results['n']} questions (scores: mean [95% bootstrap interval])", "", head,
             "|---" * (head.count("|") - 1) + "|"]

    def score(v: dict, metric: str) -> str:
        ci = v.get(f"{metric}_ci")
        return f"{v[metric]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    for m, v in results["methods"].items():
        judge = f" {score(v, 'judge')} |" if has_judge and "judge" in v else (" - |" if has_judge else "")
        speed = (f"{v['executive_prefill_tok_s']:.0f} / {v['executive_decode_tok_s']:.1f}"
                 if "executive_decode_tok_s" in v and "executive_prefill_tok_s" in v else "-")
        lines.append(f"| {m} | {score(v, 'em')} | {score(v, 'f1')} | {score(v, 'contains')} |{judge} "
                     f"{v['memory_calls_per_q']:.1f} | {v['latency_s_per_q']:.1f} | {v['executive_tokens_per_q']:.0f} | "
                     f"{v.get('json_parse_failures', 0)}/{v.get('json_turns', 0)} | {speed} |")
    read = {m: v["gold_passages_read"] for m, v in results["methods"].items() if "gold_passages_read" in v}
    if read:
        lines += ["", "gold paragraphs among the passages read: " + ", ".join(f"{m} {x:.3f}" for m, x in read.items())]
    d = results.get("diagnostics")
    if d:
        r = d["memory_recall"]
        lines += ["", f"memory recall on gold sub-questions: {r['recall']:.3f} {r['recall_ci']} over {r['probes']} "
                      f"probes (by hop {r['by_hop']})" + (f"; misses: {r['misses']['echo']:.3f} echo the question, "
                                                          f"{r['misses']['idk']:.3f} I don't know, "
                                                          f"{r['misses']['wrong']:.3f} wrong" if "misses" in r else "")]
        if "reflections_recited" in d:
            lines.append(f"own reflections recited: {d['reflections_recited']['recited']:.3f} "
                         f"({d['reflections_recited']['asked']} asked)")
            c = d["reflection_coverage"]
            lines.append(f"gold facts the reflections state: {c['coverage']:.3f} ({c['covered']}/{c['facts']})")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    names = list(results["methods"])
    metrics = ["em", "f1", "contains"] + (["judge"] if all("judge" in v for v in results["methods"].values()) else [])
    grouped_bars(path, f"{results['benchmark']} ({results['n']} questions)", names,
                 {m.upper() if m != "contains" else m: [results["methods"][n][m] for n in names] for m in metrics})


def run_eval(cfg: EvalConfig, exec_cfg: ExecutiveConfig | None = None, train: dict | None = None,
             synth: dict | None = None) -> dict:
    """`memo eval`: answer every question with every method, score, write OUT, log to MLflow. `train` and
    `synth` are the TrainConfig / SynthesizeConfig settings of a memory built here (validated by the CLI).
    Several noise levels or seeds run one evaluation each under OUT/runs/ and combine them (memo.evaluation.sweep)."""
    exec_cfg = exec_cfg or ExecutiveConfig()
    train, synth = train or {}, synth or {}
    if len(cfg.noise) > 1 or cfg.seeds > 1:
        from memo.evaluation.sweep import run_sweep

        return run_sweep(cfg, exec_cfg, train, synth, run_one)
    return run_one(cfg, exec_cfg, train, synth)


def run_one(cfg: EvalConfig, exec_cfg: ExecutiveConfig, train: dict, synth: dict,
            reflections: Path | None = None) -> dict:
    """One evaluation: one noise level, one memory (built here with `train` and `synth` unless given)."""
    out = Path(cfg.out)
    docs, questions = load_benchmark(cfg.benchmark, cfg.data, cfg.limit, cfg.noise[0], cfg.distractors)
    settings = _settings(cfg, exec_cfg, train, synth)
    done = _open_run(cfg, settings, out)

    executive = make_executive(cfg.executive_url or None, cfg.executive_model or None,
                               os.environ.get("MEMO_EXECUTIVE_API_KEY"), cfg.executive_local)
    judge = _judge(cfg, executive)
    ctx = {"cfg": cfg, "executive": executive, "exec_cfg": exec_cfg, "docs": {d.doc_id: d for d in docs}}
    pending = [(m, q) for m in cfg.methods for q in questions if (m, q.qid) not in done]
    if {"bm25", "memo_rag"} & set(cfg.methods):
        ctx["bm25"] = BM25Index(passages_of(docs, cfg.chunk_words))
    memory_label = None
    if any(m.startswith("memo_") for m, _ in pending):
        ctx["memory"], memory_label = _memory_client(cfg, docs, out, exec_cfg, train, synth, reflections)
    log.info(f"[eval] {cfg.benchmark}: {len(questions)} questions over {len(docs)} documents; methods "
             f"{', '.join(cfg.methods)}; {len(done)} answers already in {out}, {len(pending)} to go")
    (out / "traces").mkdir(exist_ok=True)
    t_start = time.time()
    with open(out / "predictions.jsonl", "a") as pred_f:
        for i, (method, q) in enumerate(pending, 1):
            refs = [q.answer] + q.aliases
            e0, m0 = usage_of(executive), usage_of(ctx.get("memory"))
            speed0 = dict(getattr(executive, "usage", {}))
            t0 = time.time()
            try:
                prediction, trace = _answer(method, q, ctx)
                error = None
            except MemoError:
                raise
            except Exception as e:  # one failing question (a timeout, a server error) must not end the run
                prediction, trace, error = "", {}, f"{type(e).__name__}: {e}"
            latency = time.time() - t0
            e1, m1 = usage_of(executive), usage_of(ctx.get("memory"))
            speed = {k: v - speed0.get(k, 0) for k, v in dict(getattr(executive, "usage", {})).items()}
            memory_calls = trace.get("memory_calls", m1[0] - m0[0]) if method.startswith("memo_") else 0
            row = {"method": method, "qid": q.qid, "question": q.question, "reference": q.answer,
                   "aliases": q.aliases, "prediction": prediction, "em": exact_match(prediction, refs),
                   "f1": round(f1(prediction, refs), 4), "contains": float(contains_reference(prediction, refs)),
                   "judge": judge_correct(judge, q.question, refs, prediction) if judge and not error else None,
                   "memory_calls": memory_calls, "executive_calls": e1[0] - e0[0],
                   "executive_tokens": e1[1] - e0[1], "memory_tokens": m1[1] - m0[1],
                   "latency_s": round(latency, 3), "error": error,
                   # the executive's engine timings (llama.cpp reports them), for prefill / decode tokens/s
                   "executive_prefill_tokens": speed.get("prefill_tokens", 0),
                   "executive_prefill_ms": speed.get("prefill_ms", 0),
                   "executive_completion_tokens": speed.get("completion_tokens", 0),
                   "executive_decode_ms": speed.get("decode_ms", 0),
                   # executive turns that asked for JSON, and those whose reply did not parse even after repair
                   "json_turns": sum(1 for st in trace.get("steps", []) if "parse" in st),
                   "json_failed": sum(1 for st in trace.get("steps", []) if st.get("parse") == "failed"),
                   "gold_passages_read": _gold_passages_read(trace, q)}
            with open(out / "traces" / f"{method}.jsonl", "a") as tf:
                tf.write(json.dumps({"qid": q.qid, "method": method, **trace}, default=str) + "\n")
            pred_f.write(json.dumps(row) + "\n")
            pred_f.flush()
            done[(method, q.qid)] = row
            rate = (time.time() - t_start) / i
            log.info(f"[eval] {i}/{len(pending)} {method:<17} em={row['em']:.0f} f1={row['f1']:.2f} "
                     f"{latency:5.1f}s  eta {rate * (len(pending) - i):.0f}s" + (f"  ERROR {error}" if error else ""))
    rows = [r for r in done.values() if r["method"] in cfg.methods]
    results = summarize(rows, cfg.methods, cfg.benchmark, len(questions))
    if cfg.diagnostics and any(m.startswith("memo_") for m in cfg.methods):
        results["diagnostics"] = _diagnostics(cfg, questions, ctx, docs, out, exec_cfg, train, synth, reflections)
    built = out / "memory.json"
    memory_label = memory_label or cfg.memory or (json.loads(built.read_text())["label"] if built.exists() else None)
    results.update({"memory": memory_label,
                    "executive": cfg.executive_model or cfg.executive_local,
                    "documents": len(docs), "errors": sum(1 for r in rows if r.get("error"))})
    write_text(out / "results.md", markdown_table(results))
    bar_chart(results, out / "results.png")
    write_text(out / "results.json", json.dumps(results, indent=2))
    results["mlflow_run_id"] = _log_to_mlflow(cfg, settings, results, out)
    write_text(out / "results.json", json.dumps(results, indent=2))
    log.info(markdown_table(results))
    return results


def _diagnostics(cfg: EvalConfig, questions, ctx: dict, docs, out: Path, exec_cfg, train: dict, synth: dict,
                 reflections: Path | None = None) -> dict:
    """Memory recall, recited reflections and coverage (memo.evaluation.diagnostics), once per OUT."""
    from memo.evaluation.diagnostics import diagnose
    from memo.synthesis import load_reflections

    path = out / "diagnostics.json"
    if path.exists():
        return json.loads(path.read_text())
    if "memory" not in ctx:
        ctx["memory"], _ = _memory_client(cfg, docs, out, exec_cfg, train, synth, reflections)
    refl = reflections or out / "reflections"
    reflections = load_reflections(str(refl)) if (refl / "reflections.parquet").exists() else None
    log.info("[eval] diagnostics: memory recall on gold sub-questions, recited reflections, coverage")
    result = diagnose(questions, ctx["memory"], reflections)
    write_text(path, json.dumps(result, indent=2))
    return result


def _log_to_mlflow(cfg: EvalConfig, settings: dict, results: dict, out: Path) -> str:
    from mlflow.entities import Metric, Param

    c = registry.client()
    run = c.create_run(registry.experiment_id("memo-eval"), run_name=f"{cfg.benchmark}-{time.strftime('%Y%m%d-%H%M%S')}",
                       tags={"memo.stage": "eval", "memo.benchmark": cfg.benchmark,
                             "memo.memory": str(results.get("memory"))})
    params = {f"{section}.{k}": v for section, vals in settings.items() for k, v in vals.items()}
    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    now = int(time.time() * 1000)
    metrics = [Metric(f"{m}.{k}", float(v), now, 0) for m, vals in results["methods"].items()
               for k, v in vals.items() if isinstance(v, (int, float))]
    c.log_batch(run.info.run_id, metrics=metrics)
    for f in ("results.json", "results.md", "results.png", "predictions.jsonl"):
        c.log_artifact(run.info.run_id, str(out / f))
    c.log_artifacts(run.info.run_id, str(out / "traces"), "traces")
    c.set_terminated(run.info.run_id)
    return run.info.run_id
