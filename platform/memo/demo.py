"""The whole MeMo loop on the demo corpus, as `make demo` runs it.

synthesize (Ray Data) -> train (Ray Train, FSDP2) -> register (MLflow, alias candidate) -> promote to
champion -> serve (Ray Serve router on 127.0.0.1) -> for each check question: the base model
answering closed-book beside the executive answering with the served memory, and the reference.
The check questions are reworded, never the training reflections, and a third need two documents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from memo.errors import MemoError, where


def load_questions(path: str) -> list[dict]:
    from memo.corpus import read_jsonl

    p = Path(path)
    if not p.exists():
        raise MemoError(f"--questions {p}: no such file")
    rows = []
    for n, row in read_jsonl(p, "an object with 'question' and 'answer'"):
        if not row.get("question") or not row.get("answer"):
            raise MemoError(f"{where(p, n)}: each line needs 'question' and 'answer'")
        rows.append(row)
    return rows


def matches(prediction: str, row: dict) -> bool:
    """The reference (or an alias) appears in the prediction after QA normalisation (as the gate scores)."""
    from memo.memory import contains_reference

    return contains_reference(prediction, [row["answer"], *row.get("aliases", [])])


def run(args) -> dict:
    from memo import executive as ex
    from memo import registry, serving
    from memo.cli import build_parser, cmd_train
    from memo.config import DEFAULT_BASE_MODEL, ServeConfig
    from memo.runtime import init_ray

    questions = load_questions(args.questions)
    t_all = time.time()
    timings: dict[str, float] = {}
    if args.skip_train:
        version = registry.resolve_version("demo", "candidate")
        print(f"== 1/4 skipped: using memo-demo version {version} (alias candidate) ==", flush=True)
        result = {}
    else:
        print("== 1/4 synthesize + train + register (jobs/train.py) ==", flush=True)
        # The same parser as `memo train`, so the demo runs exactly what a user's command would.
        result = cmd_train(build_parser().parse_args(["train", "--domain", "demo", "--corpus", str(args.corpus)]))
        timings.update(result["timings"])
        version = result["version"]

    print("\n== 2/4 promote candidate -> champion ==", flush=True)
    from memo.promotion import promote

    try:  # through the gate, as a platform team would: a worse version does not replace the champion
        promote("demo", "champion", version=version, reason="make demo")
    except MemoError as e:
        print(f"{e}\nserving the current champion instead", flush=True)
        version = registry.resolve_version("demo", "champion")

    print("\n== 3/4 serve (Ray Serve router on 127.0.0.1) ==", flush=True)
    t0 = time.time()
    init_ray()
    url = serving.run(ServeConfig(domains=["demo"], port=args.port))
    memory = ex.HttpMemory(url, "demo")
    memory.ask(["warm-up"])  # the first request loads the model into the replica
    timings["serve_start_s"] = round(time.time() - t0, 1)
    print(f"router up at {url} in {timings['serve_start_s']} s")

    print("\n== 4/4 check questions: closed-book base model vs executive + memory ==", flush=True)
    t0 = time.time()
    executive = ex.LocalLLM(DEFAULT_BASE_MODEL)
    rows, cb_ok, memo_ok, mem_ok = [], 0, 0, 0
    for i, q in enumerate(questions, 1):
        cb = ex.closed_book(q["question"], executive)
        tr = ex.single_turn(q["question"], executive, memory)
        # The executive is the 135M base model; count a hit when its answer, or the memory's direct
        # answer it was given, contains the reference (both are shown).
        direct = next(s["answer"] for s in tr.steps if s["role"] == "memory")
        ok_cb, ok_memo, ok_mem = matches(cb, q), matches(tr.answer, q), matches(direct, q)
        cb_ok += ok_cb
        memo_ok += ok_memo
        mem_ok += ok_mem
        rows.append({"id": q.get("id"), "kind": q.get("kind", ""), "question": q["question"], "reference": q["answer"],
                     "closed_book": cb, "memo": tr.answer, "memory_answer": direct, "closed_book_ok": ok_cb,
                     "memo_ok": ok_memo, "memory_version": tr.memory_version, "memory_calls": tr.memory_calls})
        print(f"\n[{i}/{len(questions)}] ({q.get('kind', '')}) {q['question']}\n"
              f"  reference:    {q['answer']}\n"
              f"  closed-book:  {cb}  {'OK' if ok_cb else 'x'}\n"
              f"  memory said:  {direct}  {'OK' if ok_mem else 'x'}\n"
              f"  MeMo answer:  {tr.answer}  {'OK' if ok_memo else 'x'}   (memo-demo v{tr.memory_version}, "
              f"{tr.memory_calls} memory calls, {tr.seconds:.1f} s)", flush=True)
    timings["questions_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_all, 1)
    from ray import serve

    serve.shutdown()
    summary = {"version": version, "alias": "champion", "questions": len(questions), "closed_book_correct": cb_ok,
               "memo_correct": memo_ok, "memory_direct_correct": mem_ok, "train_recall": result.get("train_recall"),
               "timings": timings}
    out = registry.memo_home() / "demo_results.json"
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print("\n== summary ==")
    print(f"registered model memo-demo version {version}, alias champion (and candidate)")
    n = len(questions)
    print(f"closed-book base model: {cb_ok}/{n} correct;  MeMo (executive + memory): {memo_ok}/{n} correct;  "
          f"the memory's own answer to the question: {mem_ok}/{n}")
    print("timings: " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    print(f"details: {out}")
    return summary
