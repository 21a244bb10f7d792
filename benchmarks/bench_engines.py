"""Memory generation on llama.cpp vs transformers, for the same model folder, in-process (no Serve).

Both engines answer the same questions in the memory's training format (MemoryEngine), greedy. Measured:
decode tokens/s with 1 client (one question at a time), and aggregate tokens/s with 16 concurrent
clients: transformers generates the 16 as one padded batch; llama.cpp runs one server with 16 slots
(continuous batching, 1 thread), and two such servers (replicas, 1 thread each) with the clients split.

    python benchmarks/bench_engines.py                         # SmolLM2-135M (the base memory model)
    python benchmarks/bench_engines.py --model-dir .memo/memories/demo/<run>   # a trained memory

Last line: RESULT {"llamacpp_vs_transformers", "concurrency_gain_16_vs_1", "two_replicas_gain_16_vs_1",
"agreement", "tokens_per_s": {...}, "cpu_flags"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who started the Halvenmere Cooperative?", "Which town is home to the Glimmerfield Division?",
             "In what year did manufacturing of the Vessamere Lantern begin?", "How many patents does Tobiah Quenlark own?",
             "Who leads the Ketterline Lab?", "Where is the Glimmerfield Division based?",
             "What does the Corvane Cell weigh?", "Which prize did Ysolde Marrowfen receive?"]


def run(memory, questions, max_tokens, clients):
    """Aggregate completion tokens/s with `clients` concurrent callers, each asking its share in turn."""
    t0 = time.time()
    if clients == 1:
        replies = [memory.ask([q], max_tokens)[0] for q in questions]
    else:
        with ThreadPoolExecutor(clients) as pool:
            replies = list(pool.map(lambda q: memory.ask([q], max_tokens)[0], questions))
    dt = time.time() - t0
    return sum(r.completion_tokens for r in replies) / dt, replies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="a memory model folder (default: the SmolLM2-135M base model)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "platform"))
    import torch
    from memo.engines.memory import MemoryEngine
    from memo.models import resolve_base_model
    from memo.runtime import cpu_flags, quiet

    quiet()
    model_dir = args.model_dir or resolve_base_model("smollm2-135m")
    one = QUESTIONS
    many = (QUESTIONS * (args.clients // len(QUESTIONS) + 1))[:args.clients * 2]
    tps = {}

    torch.set_num_threads(1)  # one core, like one llama.cpp thread: the per-core speed is compared
    hf = MemoryEngine(model_dir, "transformers")
    hf.ask(one[:1], 4)  # warm-up
    tps["transformers_1"], base = run(hf, one, args.max_tokens, 1)
    t0 = time.time()
    batch = hf.ask(many, args.max_tokens)  # the batch path: all concurrent questions padded together
    tps["transformers_batch"] = sum(r.completion_tokens for r in batch) / (time.time() - t0)
    del hf

    cpp = MemoryEngine(model_dir, "llamacpp", threads=1, parallel=args.clients)
    cpp.ask(one[:1], 4)
    tps["llamacpp_1"], fast = run(cpp, one, args.max_tokens, 1)
    tps["llamacpp_16"], _ = run(cpp, many, args.max_tokens, args.clients)
    cpp.close()

    # Two replicas (two servers, one thread each), the clients split between them.
    a = MemoryEngine(model_dir, "llamacpp", threads=1, parallel=args.clients // 2)
    b = MemoryEngine(model_dir, "llamacpp", threads=1, parallel=args.clients // 2)
    a.ask(one[:1], 4), b.ask(one[:1], 4)
    t0 = time.time()
    with ThreadPoolExecutor(args.clients) as pool:
        replies = list(pool.map(lambda iq: (a if iq[0] % 2 else b).ask([iq[1]], args.max_tokens)[0], enumerate(many)))
    tps["llamacpp_2x_16"] = sum(r.completion_tokens for r in replies) / (time.time() - t0)
    a.close(), b.close()

    agree = sum(x.text == y.text for x, y in zip(base, fast)) / len(base)
    print(f"\n{model_dir}; greedy, {args.max_tokens} max new tokens; CPU flags: {' '.join(cpu_flags())}\n")
    print(f"{'engine':<44}{'tok/s':>8}")
    labels = {"transformers_1": "transformers, 1 client, 1 thread", "transformers_batch":
              f"transformers, {args.clients} clients as one batch, 1 thread", "llamacpp_1": "llama.cpp, 1 client, 1 thread",
              "llamacpp_16": f"llama.cpp, {args.clients} clients, 1 server x {args.clients} slots",
              "llamacpp_2x_16": f"llama.cpp, {args.clients} clients, 2 servers (replicas)"}
    for k, v in tps.items():
        print(f"{labels[k]:<44}{v:>8.1f}")
    print(f"\nsame greedy answers, llama.cpp vs transformers: {agree:.0%} of {len(base)}")
    result = {"llamacpp_vs_transformers": round(tps["llamacpp_1"] / tps["transformers_1"], 2),
              "concurrency_gain_16_vs_1": round(tps["llamacpp_16"] / tps["llamacpp_1"], 2),
              "two_replicas_gain_16_vs_1": round(tps["llamacpp_2x_16"] / tps["llamacpp_1"], 2),
              "agreement": round(agree, 3), "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "cpu_flags": cpu_flags()}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
