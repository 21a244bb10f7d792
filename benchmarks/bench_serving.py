"""Serving throughput and latency: the real Ray Serve app over HTTP on 127.0.0.1.

For each memory engine (transformers and llama.cpp by default): C concurrent clients across M
domains for T seconds (it stops by itself), then one client alone; then, on transformers, the same
load with @serve.batch off (max_batch_size=1), the engine called in-process without Serve, and the
cold vs warm latency of a multiplexed domain. Memory models are SmolLM2-135M's architecture with
random weights (nothing to download; `--base-model tiny` for a 4-layer toy, transformers only),
registered in a throwaway MLflow registry, so the numbers measure the serving path, not answer quality.

    python benchmarks/bench_serving.py                    # ~5 min on 2 CPU cores
    python benchmarks/bench_serving.py --engines llamacpp --clients 16 --domains 3 --seconds 30

Last line: RESULT {"requests_per_s", "p50_s", "p99_s", "errors" (first engine), "engines": {engine:
{requests_per_s, p50_s, p99_s, tokens_per_s_1, tokens_per_s_C, errors}}, "llamacpp_vs_transformers"
(1-client tokens/s), "concurrency_gain_16_vs_1" (llama.cpp, aggregate tokens/s at C clients over 1),
"batched_vs_unbatched", "overhead_vs_direct", "cold_s", "warm_s", "cpu_flags", "executive_endpoint":
{requests_per_s, p50_s, p99_s, memory_calls_per_q, errors} (model memo/<domain>, the served executive)}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "When did the Vessamere Lantern enter production?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, key: str, domains: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    """C client threads, each sending requests back to back, round-robin over the domains."""
    import httpx

    lat, errors, tokens, calls, stop, lock = [], [0], [0], [0], time.time() + seconds, threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=300, headers={"authorization": f"Bearer {key}"}) as c:
            n = i
            while time.time() < stop:
                body = {"model": domains[n % len(domains)], "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": QUESTION}]}
                t0 = time.time()
                try:
                    r = c.post(url + "/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        lat.append(time.time() - t0)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                        calls[0] += r.json().get("memory_calls", 0)
                    else:
                        errors[0] += 1
                n += 1

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    lat.sort()
    return {"requests": len(lat), "requests_per_s": len(lat) / wall, "errors": errors[0],
            "tokens_per_s": tokens[0] / wall, "memory_calls_per_q": calls[0] / max(1, len(lat)),
            "p50_s": lat[len(lat) // 2] if lat else float("nan"),
            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-model", default="smollm2-135m",
                    help="a base model spec (its architecture, random weights) or tiny (a 4-layer toy; transformers only)")
    ap.add_argument("--engines", default="transformers,llamacpp", help="comma-separated memory engines to compare")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--domains", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--executive", default="qwen2.5-coder-0.5b",
                    help="the served executive for the memo/<domain> phase (a GGUF alias or HF folder; '' skips it)")
    ap.add_argument("--executive-clients", type=int, default=4)
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.base_model == "tiny" and engines != ["transformers"]:
        ap.error("--base-model tiny has a toy tokenizer llama.cpp cannot convert: add --engines transformers")

    os.environ.setdefault("MEMO_HOME", tempfile.mkdtemp(prefix="memo-bench-serve-"))
    sys.path.insert(0, str(REPO / "platform"))
    sys.path.insert(0, str(REPO / "tests"))  # the tiny test model builder
    import httpx
    import torch
    from memo import registry, serving
    from memo.config import ServeConfig
    from memo.inference import ask_memory
    from memo.models import load_model, resolve_base_model
    from memo.engines.memory import memory_gguf
    from memo.runtime import cpu_flags, init_ray, quiet
    from memo.tenants import add_tenant
    from ray import serve
    from tiny import build_tiny_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet()
    home = Path(os.environ["MEMO_HOME"])
    if args.base_model == "tiny":
        texts = [json.loads(line)["text"] for line in (REPO / "examples/demo/corpus.jsonl").read_text().splitlines()]
        folder = build_tiny_model(home / "model", texts * 3, vocab_size=600, hidden=128, layers=4)
    else:  # the real architecture with random weights: the same compute, nothing to download
        base = resolve_base_model(args.base_model)
        folder = home / "model"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        if "llamacpp" in engines:
            memory_gguf(folder)  # the GGUF a registered version carries, converted once for every domain
    names = [f"bench{i}" for i in range(args.domains)]
    for d in names:
        registry.register_memory(d, folder, registry.start_run(d, "bench", {}), {"base_model": args.base_model},
                                 "champion")
    registry.register_memory("cold", folder, registry.start_run("cold", "bench", {}), {}, "champion")
    key = add_tenant(home / "tenants.yaml", "bench", ["*"])
    init_ray()

    def start(batch: int, engine: str, executive: str = "") -> str:
        port = free_port()
        url = serving.run(ServeConfig(domains=names + ["cold"], port=port, max_new_tokens=args.max_tokens,
                                      max_batch_size=batch, max_models_per_replica=args.domains + 1,
                                      engine=engine, engine_parallel=args.clients,
                                      tenants_file=str(home / "tenants.yaml"), serve_executive=bool(executive),
                                      executive_local=executive or "auto"))
        drive(url, key, names, 1, 0.1, args.max_tokens)  # load every domain once before timing
        for d in names:
            drive(url, key, [d], 1, 0.1, args.max_tokens)
        return url

    print(f"[bench] engines {engines}: {args.clients} clients x {args.domains} domains x {args.seconds:.0f} s, "
          f"max_tokens={args.max_tokens}, model={args.base_model}, CPU flags: {' '.join(cpu_flags())}", flush=True)
    per_engine, cold, warm = {}, None, []
    for engine in engines:
        url = start(batch=8, engine=engine)
        many = drive(url, key, names, args.clients, args.seconds, args.max_tokens)
        one = drive(url, key, names[:1], 1, min(args.seconds, 10), args.max_tokens)
        per_engine[engine] = {"requests_per_s": round(many["requests_per_s"], 2), "p50_s": round(many["p50_s"], 4),
                              "p99_s": round(many["p99_s"], 4), "p50_s_1": round(one["p50_s"], 4),
                              "tokens_per_s_1": round(one["tokens_per_s"], 1),
                              "tokens_per_s_C": round(many["tokens_per_s"], 1),
                              "errors": many["errors"] + one["errors"]}
        print(f"[bench] {engine}: {per_engine[engine]}", flush=True)
        if cold is None:  # a multiplexed domain's first request (load + convert/spawn) vs warm
            h = {"authorization": f"Bearer {key}"}
            body = {"model": "cold", "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": QUESTION}]}
            t0 = time.time()
            assert httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=300).status_code == 200
            cold = time.time() - t0
            for _ in range(5):
                t0 = time.time()
                httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=300)
                warm.append(time.time() - t0)
        serve.shutdown()

    # The MeMo answer (model memo/<domain>): the served executive questions the memory over handles.
    memo = None
    if args.executive:
        url = start(batch=8, engine=engines[-1], executive=args.executive)
        drive(url, key, [f"memo/{names[0]}"], 1, 0.1, args.max_tokens)  # executive warm-up
        memo = drive(url, key, [f"memo/{d}" for d in names], args.executive_clients, args.seconds * 2, args.max_tokens)
        print(f"[bench] memo/<domain> ({args.executive} executive, {engines[-1]} memory): {memo}", flush=True)
        serve.shutdown()

    # @serve.batch on vs off, and Serve + router overhead, on the reference engine (transformers).
    url = start(batch=1, engine="transformers")
    unbatched = drive(url, key, names, args.clients, args.seconds, args.max_tokens)
    print(f"[bench] transformers unbatched: {unbatched}", flush=True)
    serve.shutdown()

    model, tok = load_model(str(folder))
    torch.set_num_threads(1)  # as in a replica with one CPU
    direct = []
    t_end = time.time() + min(args.seconds, 10)
    while time.time() < t_end:
        t0 = time.time()
        ask_memory(model, tok, [QUESTION], args.max_tokens)
        direct.append(time.time() - t0)
    direct_s = statistics.median(direct)

    first = per_engine[engines[0]]
    ref = per_engine.get("transformers")
    result = {
        "requests_per_s": first["requests_per_s"], "p50_s": first["p50_s"], "p99_s": first["p99_s"],
        "errors": sum(e["errors"] for e in per_engine.values()) + unbatched["errors"], "engines": per_engine,
        "batched_vs_unbatched": round(ref["requests_per_s"] / max(unbatched["requests_per_s"], 1e-9), 3)
        if ref else None,
        "overhead_vs_direct": round(ref["p50_s_1"] - direct_s, 4) if ref else None,
        "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 4), "cpu_flags": cpu_flags(),
    }
    if memo:
        result["executive_endpoint"] = {
            "executive": args.executive, "clients": args.executive_clients,
            "requests_per_s": round(memo["requests_per_s"], 3), "p50_s": round(memo["p50_s"], 3),
            "p99_s": round(memo["p99_s"], 3), "memory_calls_per_q": round(memo["memory_calls_per_q"], 2),
            "errors": memo["errors"]}
        result["errors"] += memo["errors"]
    if "llamacpp" in per_engine:
        lc = per_engine["llamacpp"]
        result["concurrency_gain_16_vs_1"] = round(lc["tokens_per_s_C"] / max(lc["tokens_per_s_1"], 1e-9), 2)
        if ref:
            result["llamacpp_vs_transformers"] = round(lc["tokens_per_s_1"] / max(ref["tokens_per_s_1"], 1e-9), 2)
    print(f"\n{'engine':<14} {'req/s':>8} {'p50 s':>8} {'p99 s':>8} {'tok/s 1 client':>15} "
          f"{f'tok/s {args.clients} clients':>17} {'errors':>7}")
    for engine, e in per_engine.items():
        print(f"{engine:<14} {e['requests_per_s']:>8.2f} {e['p50_s']:>8.3f} {e['p99_s']:>8.3f} "
              f"{e['tokens_per_s_1']:>15.1f} {e['tokens_per_s_C']:>17.1f} {e['errors']:>7}")
    if memo:
        e = result["executive_endpoint"]
        print(f"{'memo/<domain>':<14} {e['requests_per_s']:>8.2f} {e['p50_s']:>8.3f} {e['p99_s']:>8.3f} "
              f"{'(' + str(e['memory_calls_per_q']) + ' memory calls/q, ' + str(e['clients']) + ' clients)':>33} "
              f"{e['errors']:>7}")
    print(f"\n{'measurement':<44} {'value':>10}")
    for name, v in [(f"transformers unbatched req/s ({args.clients} clients)", unbatched["requests_per_s"]),
                    ("transformers engine in-process, p50 (s)", direct_s),
                    ("Serve + router overhead (s)", result["overhead_vs_direct"]),
                    ("cold multiplexed domain, first request (s)", cold), ("same domain warm, p50 (s)", result["warm_s"]),
                    ("failed requests", result["errors"])]:
        if v is None:
            continue
        print(f"{name:<44} {v:>10.3f}" if isinstance(v, float) else f"{name:<44} {v:>10}")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
