"""Synthesis throughput: the Ray Data step pipeline versus a plain Python loop over the same engine.

The same extraction prompts (step 1, direct facts, one per chunk) are answered three ways, from cold
(engine start-up included in every timing, since a job pays it too):
  loop        one engine in this process, one prompt per call, in a for loop (all CPU threads for hf);
  pipeline-1  `memo.synthesis.llm.runner.run_step`: Ray Data, one StepWorker actor, batches of --batch-size prompts;
  pipeline-2  the same with two actors (hf: the CPUs split between them).
Throughput is chunks/s and generated tokens/s; the loop is the baseline measured in the same run.

    python benchmarks/bench_synthesis.py                          # hf engine, SmolLM2-135M, demo corpus
    python benchmarks/bench_synthesis.py --chunks 16 --max-tokens 96
    python benchmarks/bench_synthesis.py --engine http --base-url http://127.0.0.1:8000/v1 --model qwen

Last line: RESULT {"pipeline_vs_loop", "actors_2_vs_1", "engine", ...} (throughput ratios, chunks/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["hf", "http"], default="hf")
    p.add_argument("--model", default="smollm2-135m", help="hf: alias or folder; http: the endpoint's model name")
    p.add_argument("--base-url", default="", help="http: OpenAI-compatible base URL (key in $OPENAI_API_KEY)")
    p.add_argument("--corpus", default=str(REPO / "examples" / "demo" / "corpus.jsonl"))
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-words", type=int, default=120)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    if args.engine == "http" and not args.base_url:
        print("bench_synthesis: --engine http needs --base-url", file=sys.stderr)
        return 2

    import pandas as pd
    from memo.config import SynthesizeConfig, build_config
    from memo.corpus import chunk_document, load_documents
    from memo.engines import make_engine
    from memo.runtime import init_ray, quiet
    from memo.synthesis.llm.pipeline import actor_resources, engine_spec
    from memo.synthesis.llm.runner import run_step
    from memo.synthesis.llm.worker import StepWorker

    quiet()
    chunks = [c for d in load_documents(args.corpus)
              for c in chunk_document(asdict(d), "bench", args.chunk_words, 0.0)][:args.chunks]
    if len(chunks) < args.chunks:
        print(f"bench_synthesis: {args.corpus} gives only {len(chunks)} chunks", file=sys.stderr)
    inputs = pd.DataFrame([{**c, "pass": "direct", "input_id": c["chunk_id"]} for c in chunks])
    spec = engine_spec(build_config(SynthesizeConfig, {
        "domain": "bench", "corpus": args.corpus, "out": tempfile.gettempdir(), "generator": args.engine,
        "model": args.model, "base_url": args.base_url}))
    ray = init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    step_kw = {"step": "extract", "max_tokens": args.max_tokens, "temperature": 0.0, "json_retries": 0}
    rows = []

    # Baseline: a plain loop, one prompt per call.
    t0 = time.time()
    worker = StepWorker(engine=make_engine(spec, threads=actor_resources(spec, 1)[1]), **step_kw)
    outs = [worker(inputs.iloc[[i]]) for i in range(len(inputs))]
    dt = time.time() - t0
    rows.append(("loop", 1, dt, int(sum(o["completion_tokens"].sum() for o in outs))))
    del worker

    for actors in (1, 2):
        folder = Path(tempfile.mkdtemp(prefix="bench-synth-"))
        num_cpus, threads = actor_resources(spec, actors)
        t0 = time.time()
        res = run_step("extract", inputs, folder, {**step_kw, "engine_spec": spec, "threads": threads}, actors,
                       args.batch_size, num_cpus=num_cpus)
        dt = time.time() - t0
        rows.append((f"pipeline-{actors}", actors, dt, int(res["completion_tokens"].sum())))
        shutil.rmtree(folder, ignore_errors=True)

    n = len(inputs)
    print(f"\n{n} chunks (~{args.chunk_words} words), {args.max_tokens} max new tokens, engine {args.engine}:{args.model}, "
          f"{cpus} CPUs, batch {args.batch_size}\n")
    print(f"{'mode':<12}{'actors':>7}{'seconds':>9}{'chunks/s':>10}{'gen tok/s':>11}{'vs loop':>9}")
    base = n / rows[0][2]
    for name, actors, dt, toks in rows:
        print(f"{name:<12}{actors:>7}{dt:>9.1f}{n / dt:>10.3f}{toks / dt:>11.1f}{(n / dt) / base:>8.2f}x")
    thr = {name: n / dt for name, _a, dt, _t in rows}
    result = {"pipeline_vs_loop": round(thr["pipeline-2"] / thr["loop"], 3),
              "actors_2_vs_1": round(thr["pipeline-2"] / thr["pipeline-1"], 3),
              "engine": f"{args.engine}:{args.model}", "chunks": n, "max_tokens": args.max_tokens, "cpus": cpus,
              "chunks_per_s": {k: round(v, 4) for k, v in thr.items()},
              "generated_tokens_per_s": {name: round(toks / dt, 1) for name, _a, dt, toks in rows}}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
