"""Per-query cost of MeMo versus BM25 RAG as the corpus grows (the paper's claim (e): MeMo's is flat).

The same questions are answered over corpora of 1x, 4x and 16x distractor records (MuSiQue's `--noise`),
with the same executive reading for both methods:
  bm25         retrieve the top-k passages from the whole corpus, read them;
  memo_single  decompose, ask the memory, answer. The memory is one fixed model: its size (and so its
               per-call cost) is set by the architecture, not by how much text it was trained on.
Reported per corpus size: passages indexed, index build time, per-query latency, retrieval time,
reader prompt tokens, memory calls. The baseline (the smallest corpus) is measured in the same run.

    python benchmarks/bench_query_cost.py --data ../shared/data/benchmarks/musique/musique_ans_dev.sample80.jsonl
    python benchmarks/bench_query_cost.py --data ... --memory models:/memo-musique@champion --questions 5

Last line: RESULT {"memo_latency_growth", "bm25_latency_growth", "bm25_retrieval_growth",
"memo_memory_calls", "sizes", "passages"} (growth = latency at the largest corpus / at the smallest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "benchmarks" / "musique" / "musique_ans_dev.sample80.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a MuSiQue-format JSONL file")
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--sizes", default="1,4,16", help="distractor records per question, comma-separated")
    p.add_argument("--memory", default="smollm2-135m", help="models:/memo-X@alias, a model folder or smollm2-135m")
    p.add_argument("--executive", default="smollm2-135m")
    p.add_argument("--k", type=int, default=9)
    args = p.parse_args()
    if not Path(args.data).is_file():
        print(f"bench_query_cost: --data {args.data}: no such file", file=sys.stderr)
        return 2

    from memo.config import ExecutiveConfig
    from memo.evaluation.baselines import BM25Index, passages_of, read_passages
    from memo.evaluation.benchmarks import load_benchmark
    from memo.executive import single_turn
    from memo.executive.clients import LocalLLM, load_memory
    from memo.runtime import quiet

    quiet()
    executive = LocalLLM(args.executive)
    memory = load_memory(args.memory, max_tokens=48)
    cfg = ExecutiveConfig(max_subquestions=2)

    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        docs, questions = load_benchmark("musique", args.data, args.questions, noise=size)
        t0 = time.time()
        index = BM25Index(passages_of(docs, 200))
        build_s = time.time() - t0
        bm25_lat, retr, prompt_tokens, memo_lat, calls = [], [], [], [], []
        for q in questions:
            t0 = time.time()
            hits = index.search(q.question, args.k)
            retr.append(time.time() - t0)
            before = executive.usage["prompt_tokens"]
            read_passages(q.question, hits, executive, 32)
            bm25_lat.append(time.time() - t0)
            prompt_tokens.append(executive.usage["prompt_tokens"] - before)
            t0 = time.time()
            tr = single_turn(q.question, executive, memory, cfg)
            memo_lat.append(time.time() - t0)
            calls.append(tr.memory_calls)
        rows.append({"size": size, "documents": len(docs), "passages": len(index.passages), "build_s": build_s,
                     "bm25_s": statistics.mean(bm25_lat), "retrieval_ms": 1000 * statistics.mean(retr),
                     "reader_prompt_tokens": statistics.mean(prompt_tokens), "memo_s": statistics.mean(memo_lat),
                     "memory_calls": statistics.mean(calls)})
        r = rows[-1]
        print(f"  {size:>3}x: {r['passages']} passages indexed in {r['build_s']:.2f} s; bm25 {r['bm25_s']:.2f} s/q, "
              f"memo {r['memo_s']:.2f} s/q", flush=True)

    print(f"\n{len(questions)} MuSiQue questions per size, top-{args.k} passages, executive {args.executive}, "
          f"memory {args.memory}\n")
    print(f"{'distractors':>11} {'passages':>8} {'index s':>8} {'retrieve ms':>11} {'reader tok':>10} "
          f"{'bm25 s/q':>9} {'memo s/q':>9} {'memory calls':>12}")
    for r in rows:
        print(f"{r['size']:>10}x {r['passages']:>8} {r['build_s']:>8.2f} {r['retrieval_ms']:>11.2f} "
              f"{r['reader_prompt_tokens']:>10.0f} {r['bm25_s']:>9.2f} {r['memo_s']:>9.2f} {r['memory_calls']:>12.1f}")
    first, last = rows[0], rows[-1]
    result = {"memo_latency_growth": round(last["memo_s"] / first["memo_s"], 3),
              "bm25_latency_growth": round(last["bm25_s"] / first["bm25_s"], 3),
              "bm25_retrieval_growth": round(last["retrieval_ms"] / max(first["retrieval_ms"], 1e-6), 3),
              "memo_memory_calls": [r["memory_calls"] for r in rows], "sizes": sizes,
              "passages": [r["passages"] for r in rows]}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
