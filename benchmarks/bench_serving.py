"""Serving throughput and latency: the real Ray Serve app over HTTP on 127.0.0.1.

C concurrent clients across M domains for T seconds (it stops by itself), then the same load with
@serve.batch off (max_batch_size=1), the engine called in-process without Serve, and the cold vs
warm latency of a multiplexed domain. Memory models are random-initialised from a config (tiny by
default; `--base-model smollm2-135m` for the real architecture), registered in a throwaway MLflow
registry, so the numbers measure the serving path, not answer quality.

    python benchmarks/bench_serving.py                    # ~2 min on 2 CPU cores
    python benchmarks/bench_serving.py --clients 16 --domains 3 --seconds 30

Last line: RESULT {"requests_per_s", "p50_s", "p99_s", "errors", "batched_vs_unbatched",
"overhead_vs_direct", "cold_s", "warm_s"}.
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

    lat, errors, stop, lock = [], [0], time.time() + seconds, threading.Lock()

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
                    (lat.append(time.time() - t0) if ok else errors.__setitem__(0, errors[0] + 1))
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
            "p50_s": lat[len(lat) // 2] if lat else float("nan"),
            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-model", default="tiny", help="tiny (random 2-layer Llama) or a base model spec")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--domains", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    os.environ.setdefault("MEMO_HOME", tempfile.mkdtemp(prefix="memo-bench-serve-"))
    sys.path.insert(0, str(REPO / "platform"))
    sys.path.insert(0, str(REPO / "tests"))  # the tiny test model builder
    import httpx
    import torch
    from memo import registry, serving
    from memo.config import ServeConfig
    from memo.inference import ask_memory
    from memo.models import load_model, resolve_base_model
    from memo.runtime import init_ray, quiet
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
    names = [f"bench{i}" for i in range(args.domains)]
    for d in names:
        registry.register_memory(d, folder, registry.start_run(d, "bench", {}), {"base_model": args.base_model},
                                 "champion")
    registry.register_memory("cold", folder, registry.start_run("cold", "bench", {}), {}, "champion")
    key = add_tenant(home / "tenants.yaml", "bench", ["*"])
    init_ray()

    def start(batch: int) -> str:
        port = free_port()
        url = serving.run(ServeConfig(domains=names + ["cold"], port=port, max_new_tokens=args.max_tokens,
                                      max_batch_size=batch, max_models_per_replica=args.domains + 1,
                                      tenants_file=str(home / "tenants.yaml")))
        drive(url, key, names, 1, 0.1, args.max_tokens)  # load every domain once before timing
        for d in names:
            drive(url, key, [d], 1, 0.1, args.max_tokens)
        return url

    print(f"[bench] {args.clients} clients x {args.domains} domains x {args.seconds:.0f} s, "
          f"max_tokens={args.max_tokens}, model={args.base_model}", flush=True)
    url = start(batch=8)
    batched = drive(url, key, names, args.clients, args.seconds, args.max_tokens)
    print(f"[bench] batched: {batched}", flush=True)
    single = drive(url, key, names[:1], 1, min(args.seconds, 10), args.max_tokens)
    h = {"authorization": f"Bearer {key}"}
    body = {"model": "cold", "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": QUESTION}]}
    t0 = time.time()
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=300).status_code == 200
    cold = time.time() - t0
    warm = []
    for _ in range(5):
        t0 = time.time()
        httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=300)
        warm.append(time.time() - t0)
    serve.shutdown()

    url = start(batch=1)
    unbatched = drive(url, key, names, args.clients, args.seconds, args.max_tokens)
    print(f"[bench] unbatched: {unbatched}", flush=True)
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

    result = {
        "requests_per_s": round(batched["requests_per_s"], 2), "p50_s": round(batched["p50_s"], 4),
        "p99_s": round(batched["p99_s"], 4), "errors": batched["errors"] + unbatched["errors"] + single["errors"],
        "batched_vs_unbatched": round(batched["requests_per_s"] / max(unbatched["requests_per_s"], 1e-9), 3),
        "overhead_vs_direct": round(single["p50_s"] - direct_s, 4),
        "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 4),
    }
    print(f"\n{'measurement':<44} {'value':>10}")
    for name, v in [(f"batched req/s ({args.clients} clients)", batched["requests_per_s"]),
                    (f"unbatched req/s ({args.clients} clients)", unbatched["requests_per_s"]),
                    ("p50 / p99 latency, batched (s)", f"{batched['p50_s']:.3f}/{batched['p99_s']:.3f}"),
                    ("one client over HTTP, p50 (s)", single["p50_s"]), ("engine in-process, p50 (s)", direct_s),
                    ("Serve + router overhead (s)", result["overhead_vs_direct"]),
                    ("cold multiplexed domain, first request (s)", cold), ("same domain warm, p50 (s)", result["warm_s"]),
                    ("failed requests", result["errors"])]:
        print(f"{name:<44} {v:>10.3f}" if isinstance(v, float) else f"{name:<44} {v:>10}")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
