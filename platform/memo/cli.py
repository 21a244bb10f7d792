"""`memo` command line. The job scripts in jobs/ call `main` with their own argv, so both share one
implementation (trl style): `python jobs/train.py ...` == `memo train ...`.

    memo synthesize --domain demo --corpus examples/demo/corpus.jsonl --out .memo/reflections/demo
    memo train --domain demo --corpus examples/demo/corpus.jsonl        # synthesize + train + register
    memo promote --domain demo --to champion            # gated: refuses a worse candidate
    memo rollback --domain demo
    memo tenants add --file tenants.yaml --name team-a --domains demo --rpm 120
    memo status
    memo serve --domains demo
    memo ask --domain demo "Who started the Halvenmere Cooperative?"
    memo eval --benchmark musique --data musique.jsonl --limit 20 --out eval/musique
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from memo.errors import GateRefused, MemoError


def _config_values(args, fields: dict) -> dict:
    """Merge, lowest first: --config YAML, explicit flags, --set overrides."""
    from memo.config import load_yaml, parse_overrides

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in fields.items() if v is not None})
    values.update(parse_overrides(getattr(args, "set", None)))
    return values


def _executive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executive-url", help="OpenAI-compatible base URL (key in MEMO_EXECUTIVE_API_KEY)")
    p.add_argument("--executive-model")
    p.add_argument("--executive-local", help="local executive model (default: smollm2-135m)")


def _benchmark_args(p: argparse.ArgumentParser, limit_help: str = "first N questions (default: all)") -> None:
    p.add_argument("--benchmark", required=True, help="musique, hotpotqa, 2wiki or narrativeqa")
    p.add_argument("--data", required=True, help="the benchmark's JSONL file (read in place, never copied)")
    p.add_argument("--limit", type=int, help=limit_help)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file whose keys are the stage config fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (repeatable)")


def cmd_synthesize(args) -> dict:
    from memo.config import SynthesizeConfig, build_config
    from memo.reflections import synthesize
    from memo.runtime import init_ray

    cfg = build_config(SynthesizeConfig, _config_values(args, {
        "domain": args.domain, "corpus": args.corpus, "out": args.out, "generator": args.generator,
        "model": args.model, "base_url": args.base_url, "workers": args.workers}))
    init_ray()
    return synthesize(cfg)


def default_reflections_dir(domain: str, corpus: str, generator: str = "rules") -> Path:
    """One folder per corpus version and generator, so synthesizing with another generator never
    overwrites the reflections an earlier memory version was trained on."""
    from memo.config import memo_home
    from memo.corpus import corpus_hash, load_documents

    name = corpus_hash(load_documents(corpus))[:12]
    return memo_home() / "reflections" / domain / (name if generator == "rules" else f"{name}-{generator}")


def cmd_train(args) -> dict:
    """Train stage; with --corpus instead of --reflections it runs synthesize first (the platform job)."""
    from memo.config import SynthesizeConfig, TrainConfig, build_config, check_domain
    from memo.memory import train
    from memo.reflections import synthesize
    from memo.runtime import init_ray

    check_domain(args.domain)
    if bool(args.reflections) == bool(args.corpus):
        raise MemoError("give exactly one of --reflections DIR (synthesized already) or --corpus PATH "
                        "(synthesize first)")
    if args.parent:  # a missing parent is an error before any synthesis or worker starts
        from memo import registry

        if not args.parent.isdigit():
            registry.resolve_version(args.domain, args.parent)
    reflections = args.reflections
    synth_cfg = None
    if args.corpus:
        reflections = str(default_reflections_dir(args.domain, args.corpus, args.generator))
        synth = {"domain": args.domain, "corpus": args.corpus, "out": reflections, "generator": args.generator,
                 "model": args.generator_model, "base_url": args.generator_url}
        synth_cfg = build_config(SynthesizeConfig, {k: v for k, v in synth.items() if v is not None})
    cfg = build_config(TrainConfig, _config_values(args, {
        "domain": args.domain, "reflections": reflections, "base_model": args.base_model, "workers": args.workers,
        "epochs": args.epochs, "lr": args.lr, "device": args.device, "parent": args.parent,
        "finetune": args.finetune,
        "register": False if args.no_register else None}))
    init_ray()
    t0 = time.time()
    timings = {}
    if synth_cfg:
        synthesize(synth_cfg)
        timings["synthesize_s"] = round(time.time() - t0, 1)
    result = train(cfg)
    timings["train_s"] = result["seconds"]
    result["timings"] = timings
    return result


def cmd_promote(args) -> dict:
    from memo.promotion import promote

    return promote(args.domain, args.to, args.from_alias, args.version, args.qa, args.margin, args.force,
                   args.reason or "")


def cmd_rollback(args) -> dict:
    from memo.promotion import rollback

    return rollback(args.domain, args.alias)


def cmd_tenants_add(args) -> dict:
    from memo.tenants import add_tenant

    key = add_tenant(args.file, args.name, [d for d in args.domains.split(",") if d], args.rpm)
    # The key is shown once, on stdout only; the file keeps its sha256.
    print(f"tenant {args.name!r} added to {args.file} (domains {args.domains}, {args.rpm or 'no'} requests/min limit)")
    print(f"API key (shown once; store it in your secret manager): {key}")
    return {"name": args.name}


def cmd_status(args) -> dict:
    from memo import registry

    domains = [args.domain] if args.domain else registry.list_domains()
    if args.domain and args.domain not in registry.list_domains():
        raise MemoError(f"--domain {args.domain}: unknown domain; known: {', '.join(registry.list_domains()) or 'none'}")
    out = {"tracking_uri": registry.tracking_uri(), "domains": [registry.domain_status(d) for d in domains]}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return out
    print(f"registry: {out['tracking_uri']}")
    if not domains:
        print("no domains registered yet: run `memo train --domain D --corpus PATH`")
    for st in out["domains"]:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(st["aliases"].items())) or "no aliases"
        print(f"\n{st['registered_model']}  ({aliases})")
        for v in st["versions"]:
            tags = [a for a, ver in st["aliases"].items() if ver == str(v["version"])]
            print(f"  v{v['version']:<4} base={v['base_model']} rows={v['rows']} train_recall={v['train_recall']} "
                  f"run={v['run_id'][:8]} {' '.join('@' + t for t in tags)}")
        for dep, s in st["serving"].items():
            print(f"  served by {dep}: v{s['version']} since {s['since']}")
        for span in st["serving_history"][-6:]:
            print(f"  {span['deployment']} served v{span['version']} from {span['since']} "
                  f"to {span['until'] or 'now'}")
        for h in st["alias_history"][-5:]:
            was = f"v{h['from']}" if h['from'] else "(new)"
            print(f"  {h['at']}  {h['alias']}: {was} -> v{h['to']}  {h.get('reason', '')}")
    return out


def cmd_serve(args) -> None:
    from memo import serving
    from memo.config import ServeConfig, build_config
    from memo.runtime import init_ray

    cfg = build_config(ServeConfig, _config_values(args, {
        "domains": args.domains, "alias": args.alias, "host": args.host, "port": args.port,
        "tenants_file": args.tenants_file}))
    init_ray()
    url = serving.run(cfg)
    print(f"memo router on {url}  (GET {url}/v1/models, POST {url}/v1/chat/completions); Ctrl-C stops it",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def cmd_ask(args) -> dict:
    from memo import executive as ex
    from memo import registry
    from memo.config import DEFAULT_BASE_MODEL

    llm = ex.make_executive(args.executive_url, args.executive_model,
                            os.environ.get("MEMO_EXECUTIVE_API_KEY"), args.executive_local or DEFAULT_BASE_MODEL)
    if args.url:
        memory = ex.HttpMemory(args.url, args.domain, os.environ.get("MEMO_API_KEY"))
    else:
        version = registry.resolve_version(args.domain, args.alias)
        memory = ex.LocalMemory(str(registry.download_version(args.domain, version)))
        memory.version = version
    tr = ex.single_turn(args.question, llm, memory)
    if args.json:
        print(json.dumps(asdict(tr), indent=2))
    else:
        for s in tr.steps:
            if s["role"] == "memory":
                print(f"  memory  Q: {s['question']}\n          A: {s['answer']}")
        print(f"answer (memo-{args.domain} v{tr.memory_version}): {tr.answer}")
    return asdict(tr)


def cmd_corpus(args) -> dict:
    from memo.evaluation import load_benchmark, write_benchmark

    docs, questions = load_benchmark(args.benchmark, args.data, args.limit, args.noise, args.distractors)
    out = write_benchmark(docs, questions, args.out)
    print(f"{args.benchmark}: {out['questions']} questions over {out['documents']} paragraphs -> "
          f"{args.out}/corpus.jsonl, {args.out}/questions.jsonl")
    return out


def cmd_coverage(args) -> dict:
    from memo.evaluation import load_benchmark, reflection_coverage
    from memo.reflections import load_reflections

    _docs, questions = load_benchmark(args.benchmark, args.data, args.limit)
    df = load_reflections(args.reflections)
    out = {**reflection_coverage(df, questions), "per_step": {k: int(v) for k, v in df["step"].value_counts().items()}}
    print(f"coverage of {args.benchmark} gold facts by {args.reflections}: {out['covered']}/{out['facts']} "
          f"= {out['coverage']:.1%} (by hop: {out['by_hop']})")
    return out


def cmd_eval(args) -> dict:
    """Split --config/--set keys between the eval, executive-protocol and (memory built here) train configs."""
    import dataclasses

    from memo.config import EvalConfig, ExecutiveConfig, TrainConfig, build_config
    from memo.evaluation import run_eval

    values = _config_values(args, {
        "benchmark": args.benchmark, "data": args.data, "out": args.out, "limit": args.limit, "noise": args.noise,
        "distractors": args.distractors, "methods": args.methods, "memory": args.memory,
        "memory_url": args.memory_url, "domain": args.domain, "executive_url": args.executive_url,
        "executive_model": args.executive_model, "executive_local": args.executive_local,
        "judge_url": args.judge_url, "judge_model": args.judge_model, "bm25_k": args.bm25_k})
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (EvalConfig, ExecutiveConfig, TrainConfig)}
    ev, exe, tr = {}, {}, dict(values.pop("train_overrides", None) or {})
    for k, v in values.items():
        if k in fields[EvalConfig]:
            ev[k] = v
        elif k in fields[ExecutiveConfig]:
            exe[k] = v
        elif k in fields[TrainConfig] and k not in ("domain", "reflections"):
            tr[k] = v
        else:
            raise MemoError(f"unknown setting {k!r}: use a field of the eval config ({', '.join(sorted(fields[EvalConfig]))}), "
                            f"the executive protocol ({', '.join(sorted(fields[ExecutiveConfig]))}) "
                            "or the train config (for a memory built here)")
    ev["train_overrides"] = tr
    return run_eval(build_config(EvalConfig, ev), build_config(ExecutiveConfig, exe))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memo", description="MeMo: memory as a model, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthesize", help="corpus -> reflections (Ray Data)")
    s.add_argument("--domain", required=True)
    s.add_argument("--corpus", required=True, help="JSONL (one document per line) or a folder of .txt/.md")
    s.add_argument("--out", required=True, help="output folder for reflections.parquet, rejects, stats.json")
    s.add_argument("--generator", default=None, choices=["rules", "hf", "http", "vllm"],
                   help="rules (offline, default), hf (local transformers), http (OpenAI-compatible), vllm (GPU)")
    s.add_argument("--model", default=None, help="hf: alias or folder (smollm2-135m); http/vllm: model name")
    s.add_argument("--base-url", default=None, help="http: the endpoint, e.g. http://127.0.0.1:8000/v1; the key "
                   "is read from $OPENAI_API_KEY (or the variable named by --set api_key_env=...)")
    s.add_argument("--workers", type=int, default=None, help="Ray Data actors per step")
    _common(s)
    s.set_defaults(fn=cmd_synthesize)

    t = sub.add_parser("train", help="reflections -> memory model (Ray Train) -> registered version")
    t.add_argument("--domain", required=True)
    t.add_argument("--reflections", help="folder written by `memo synthesize`")
    t.add_argument("--corpus", help="synthesize this corpus first (the full platform job)")
    t.add_argument("--generator", default="rules", choices=["rules", "hf", "http", "vllm"],
                   help="generator used with --corpus")
    t.add_argument("--generator-model", help="with --corpus and an LLM generator: its model (see memo synthesize)")
    t.add_argument("--generator-url", help="with --corpus --generator http: the endpoint's base URL")
    t.add_argument("--base-model", help="smollm2-135m (default), a local HF folder, or a cached HF id")
    t.add_argument("--workers", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--device", choices=["cpu", "cuda"])
    t.add_argument("--finetune", choices=["full", "lora"], help="full SFT (default) or LoRA adapters")
    t.add_argument("--from", dest="parent", metavar="ALIAS_OR_VERSION",
                   help="continual update: fine-tune this version of memo-<domain> (e.g. champion) on the new "
                        "reflections plus a replay share of earlier ones")
    t.add_argument("--no-register", action="store_true", help="train and export only")
    _common(t)
    t.set_defaults(fn=cmd_train)

    pr = sub.add_parser("promote", help="move an alias (e.g. candidate -> champion)")
    pr.add_argument("--domain", required=True)
    pr.add_argument("--to", default="champion")
    pr.add_argument("--from", dest="from_alias", default="candidate")
    pr.add_argument("--version", help="promote this version instead of the --from alias")
    pr.add_argument("--qa", action="append", default=[], metavar="FILE.jsonl",
                    help="extra held-out QA for the gate (question, answer, aliases); repeatable")
    pr.add_argument("--margin", type=float, default=0.05,
                    help="refuse when the candidate scores more than this below the current version")
    pr.add_argument("--force", action="store_true", help="promote even if the gate fails (logged)")
    pr.add_argument("--reason")
    pr.set_defaults(fn=cmd_promote)

    rb = sub.add_parser("rollback", help="point an alias back at its previous version")
    rb.add_argument("--domain", required=True)
    rb.add_argument("--alias", default="champion")
    rb.set_defaults(fn=cmd_rollback)

    tn = sub.add_parser("tenants", help="manage router API keys")
    tsub = tn.add_subparsers(dest="tenants_command", required=True)
    ta = tsub.add_parser("add", help="add a tenant and print its new API key once")
    ta.add_argument("--file", required=True, help="tenants YAML (created if missing; mode 600)")
    ta.add_argument("--name", required=True)
    ta.add_argument("--domains", required=True, help="comma-separated domains, or * for all")
    ta.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = unlimited)")
    ta.set_defaults(fn=cmd_tenants_add)

    st = sub.add_parser("status", help="domains, versions, aliases and what is served")
    st.add_argument("--domain")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    sv = sub.add_parser("serve", help="run the OpenAI-compatible router (Ray Serve) in the foreground")
    sv.add_argument("--domains", help="comma-separated domains (default: every registered domain)")
    sv.add_argument("--alias")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--tenants-file", help="tenants YAML with hashed API keys (see `memo tenants add`)")
    _common(sv)
    sv.set_defaults(fn=cmd_serve)

    a = sub.add_parser("ask", help="answer a question with an executive that questions the memory")
    a.add_argument("--domain", required=True)
    a.add_argument("question")
    a.add_argument("--url", help="router base URL (e.g. http://127.0.0.1:8000); default: load the memory here")
    a.add_argument("--alias", default="champion")
    _executive_args(a)
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_ask)

    c = sub.add_parser("corpus", help="a benchmark file -> corpus.jsonl (for synthesize) + questions.jsonl")
    _benchmark_args(c)
    c.add_argument("--noise", type=float, default=0.0, help="extra distractors: paragraphs of noise x N more records")
    c.add_argument("--distractors", type=int, help="keep at most K non-gold paragraphs per question (default: all)")
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_corpus)

    v = sub.add_parser("coverage", help="share of a benchmark's gold facts that the reflections state")
    _benchmark_args(v, "first N questions, as given to `memo corpus` (default: all)")
    v.add_argument("--reflections", required=True, help="folder written by `memo synthesize`")
    v.set_defaults(fn=cmd_coverage)

    e = sub.add_parser("eval", help="MeMo vs closed-book, BM25 RAG and oracle on a benchmark sample")
    _benchmark_args(e)
    e.add_argument("--out", required=True, help="results.json, results.md, results.png, predictions, traces")
    e.add_argument("--noise", type=float, help="extra distractors: paragraphs of noise x N more records")
    e.add_argument("--distractors", type=int, help="keep at most K non-gold paragraphs per question")
    e.add_argument("--methods", help="comma-separated: closed_book,bm25,oracle,memo_single,memo_structured,"
                                     "memo_gold_decomp (default: the first five)")
    e.add_argument("--memory", help="models:/memo-X@alias, models:/memo-X/N or a model folder "
                                    "(default: synthesize and train one for this corpus)")
    e.add_argument("--memory-url", help="ask the memory through this router (with --domain; key in MEMO_API_KEY)")
    e.add_argument("--domain", help="domain to register a memory built here under, or the router's model name")
    _executive_args(e)
    e.add_argument("--judge-url", help="optional LLM judge, OpenAI-compatible (key in MEMO_JUDGE_API_KEY)")
    e.add_argument("--judge-model")
    e.add_argument("--bm25-k", type=int, help="passages the BM25 baseline reads (default 9, as in the paper)")
    _common(e)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="the whole loop on the demo corpus (what `make demo` runs)")
    d.add_argument("--corpus", default="examples/demo/corpus.jsonl")
    d.add_argument("--questions", default="examples/demo/questions.jsonl")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--skip-train", action="store_true", help="re-run the checks on the current candidate")
    d.set_defaults(fn=lambda args: __import__("memo.demo", fromlist=["run"]).run(args))
    return p


def main(argv: list[str] | None = None) -> int:
    from memo.runtime import quiet

    quiet()
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except GateRefused as e:
        print(f"memo {args.command}: {e}", file=sys.stderr)
        return 3
    except MemoError as e:
        print(f"memo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
