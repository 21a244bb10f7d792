"""Benchmark loaders and QA metrics: MuSiQue, HotpotQA (distractor), 2WikiMultihopQA, NarrativeQA.

Each loader reads the benchmark's public JSONL format and returns the corpus the memory is built from
(the gold and distractor paragraphs of the selected questions, deduplicated by title and text) and the
questions with their reference answers and aliases. `noise` adds the paragraphs of that many times as
many other questions as distractors, so cost and accuracy can be measured as the corpus grows. The
data files are third-party: read them where they are, never copy them into the repository.

    memo corpus --benchmark musique --data ../shared/data/benchmarks/musique/musique_ans_dev.sample80.jsonl \\
        --limit 20 --out /tmp/musique20     # corpus.jsonl for `memo synthesize`, questions.jsonl for checks
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memo.corpus import Document, read_jsonl
from memo.errors import MemoError, where
from memo.reflections import IDK_ANSWER

BENCHMARKS = ("musique", "hotpotqa", "2wiki", "narrativeqa")


@dataclass
class Question:
    qid: str
    question: str
    answer: str
    aliases: list[str] = field(default_factory=list)
    gold_doc_ids: list[str] = field(default_factory=list)
    decomposition: list[dict] = field(default_factory=list)  # MuSiQue: [{question, answer}], "#1" = answer 1
    kind: str = ""


def _doc_id(title: str, text: str) -> str:
    import hashlib

    return "p-" + hashlib.sha256(f"{title}\x00{text}".encode()).hexdigest()[:12]


def _paragraphs(name: str, row: dict, loc: str) -> list[tuple[str, str, bool]]:
    """(title, text, is_gold) for one record, in the benchmark's own layout."""
    try:
        if name == "musique":
            return [(p["title"], p["paragraph_text"], bool(p.get("is_supporting"))) for p in row["paragraphs"]]
        if name in ("hotpotqa", "2wiki"):
            gold = {t for t, _ in row.get("supporting_facts", [])}
            return [(t, " ".join(s.strip() for s in sents), t in gold) for t, sents in row["context"]]
        return [("", row["passage"], True)]
    except (KeyError, TypeError, ValueError) as e:
        raise MemoError(f"{loc}: not a {name} record (missing or malformed {e})") from None


def _question(name: str, row: dict, loc: str, gold: list[str]) -> Question:
    try:
        if name == "musique":
            return Question(row["id"], row["question"], row["answer"], list(row.get("answer_aliases", [])), gold,
                            [{"question": d["question"], "answer": d["answer"]} for d in row["question_decomposition"]],
                            row["id"].split("__")[0])
        if name == "hotpotqa":
            return Question(row["_id"], row["question"], row["answer"], [], gold, [], row.get("type", ""))
        if name == "2wiki":
            return Question(row["_id"], row["question"], row["answer"], list(row.get("answer_aliases", [])), gold, [],
                            row.get("type", ""))
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return Question("", row["question"], answers[0], answers[1:], gold, [], "summary")
    except (KeyError, TypeError, IndexError) as e:
        raise MemoError(f"{loc}: not a {name} record (missing or malformed {e})") from None


def load_benchmark(name: str, path: str | Path, limit: int | None = None, noise: float = 0.0,
                   distractors: int | None = None) -> tuple[list[Document], list[Question]]:
    """(corpus, questions) for the first `limit` questions of a benchmark file. `distractors` keeps at
    most that many non-gold paragraphs per question (None: all of them), so a CPU-sized run can keep the
    gold evidence and still carry distractors."""
    if name not in BENCHMARKS:
        raise MemoError(f"--benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    p = Path(path)
    if not p.exists():
        raise MemoError(f"--data {p}: no such file")
    if limit is not None and limit < 1:
        raise MemoError(f"--limit {limit}: use 1 or more")
    if noise < 0:
        raise MemoError(f"--noise {noise}: use 0 or more (extra distractors, as a multiple of the questions)")
    if distractors is not None and distractors < 0:
        raise MemoError(f"--distractors {distractors}: use 0 or more (non-gold paragraphs kept per question)")
    records = list(read_jsonl(p, f"a {name} record"))
    if not records:
        raise MemoError(f"{p}: no records")
    n = min(limit or len(records), len(records))
    n_noise = min(int(round(noise * n)), len(records) - n)
    docs: dict[str, Document] = {}
    questions: list[Question] = []
    for k, (line, row) in enumerate(records[:n + n_noise]):
        loc = where(p, line)
        gold, kept = [], 0
        for title, text, is_gold in _paragraphs(name, row, loc):
            if not is_gold and k < n and distractors is not None:
                if kept >= distractors:
                    continue
                kept += 1
            did = _doc_id(title, text)
            docs.setdefault(did, Document(did, title, text, "", loc))
            if is_gold:
                gold.append(did)
        if k < n:  # the rest only contribute distractor paragraphs
            q = _question(name, row, loc, gold)
            q.qid = q.qid or f"{p.stem}-{line}"
            questions.append(q)
    return list(docs.values()), questions


def write_corpus(docs: list[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n")


def write_benchmark(docs: list[Document], questions: list[Question], out: str | Path) -> dict:
    """OUT/corpus.jsonl (the `memo synthesize` input) and OUT/questions.jsonl (question, answer, aliases)."""
    o = Path(out)
    write_corpus(docs, o / "corpus.jsonl")
    with open(o / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(asdict(q)) + "\n")
    return {"documents": len(docs), "questions": len(questions), "out": str(o)}


# ---------------------------------------------------------------------------------------------------
# Metrics: the standard SQuAD/HotpotQA normalisation, max over the reference and its aliases.

def reflection_coverage(reflections, questions: list[Question]) -> dict:
    """How much of what the benchmark needs the reflections state: the share of gold facts whose answer
    (normalised) appears in at least one reflection answer. MuSiQue: each `question_decomposition[].answer`
    (per hop); other benchmarks: the final answer or one of its aliases."""
    from memo.memory import normalize_answer

    answers = " \n ".join(normalize_answer(a) for a in reflections["answer"])
    hop, by_hop = [], {}
    for q in questions:
        facts = [d.get("answer", "") for d in q.decomposition] or [q.answer]
        for i, fact in enumerate(facts):
            refs = [fact] + (q.aliases if not q.decomposition or i == len(facts) - 1 else [])
            hit = any(normalize_answer(r) and f" {normalize_answer(r)} " in f" {answers} " for r in refs)
            hop.append(hit)
            by_hop.setdefault(f"hop{i + 1}", []).append(hit)
    return {"facts": len(hop), "covered": int(sum(hop)), "coverage": round(sum(hop) / max(1, len(hop)), 3),
            "by_hop": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_hop.items())},
            "reflections": len(reflections)}


def exact_match(prediction: str, references: list[str]) -> float:
    from memo.memory import normalize_answer

    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def f1(prediction: str, references: list[str]) -> float:
    from memo.memory import token_f1

    return max((token_f1(prediction, r) for r in references), default=0.0)


def judge_correct(judge, question: str, references: list[str], prediction: str) -> float:
    """LLM-judge correctness (the paper's accuracy): 1.0 for a "yes", 0.0 otherwise."""
    prompt = (f"Question: {question}\nReference answer(s): {' | '.join(references)}\nProposed answer: {prediction}\n"
              "Does the proposed answer give the same answer as a reference (extra detail is fine)? "
              "Reply yes or no.")
    out = judge.complete([{"role": "user", "content": prompt}], max_tokens=4, temperature=0.0)
    return float(out.strip().lower().startswith("yes"))


# ---------------------------------------------------------------------------------------------------
# Baselines. Every method uses the same executive as its reader, so the methods differ only in where
# the knowledge comes from: nowhere (closed_book), BM25 top-k passages, the gold paragraphs (oracle),
# or the memory model (memo_*).

READER = ("Passages:\n{passages}\n\nUsing the passages, answer the question in a few words.\n"
          "Question: {q}\nAnswer:")


class BM25Index:
    """BM25 over the corpus' passages (bm25s, English stop words removed)."""

    def __init__(self, passages: list[dict]):
        import bm25s

        if not passages:
            raise MemoError("BM25: the corpus has no passages")
        self.passages = passages
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([p["text"] for p in passages], stopwords="en", show_progress=False),
                             show_progress=False)

    def search(self, query: str, k: int) -> list[dict]:
        import bm25s

        k = min(k, len(self.passages))
        ids, _ = self.retriever.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False), k=k,
                                         show_progress=False)
        return [self.passages[i] for i in ids[0]]


def passages_of(docs: list[Document], chunk_words: int) -> list[dict]:
    from memo.corpus import chunk_document

    out = []
    for d in docs:
        row = {"doc_id": d.doc_id, "title": d.title, "text": d.text, "doc_date": "", "source": d.source}
        out += [{"doc_id": c["doc_id"], "chunk_id": c["chunk_id"], "title": c["title"], "text": c["text"]}
                for c in chunk_document(row, "eval", chunk_words, 0.1)]
    return out


def read_passages(question: str, passages: list[dict], executive, max_tokens: int) -> tuple[str, dict]:
    text = "\n".join(f"[{i + 1}] {p['title'] + ': ' if p['title'] else ''}{p['text']}" for i, p in enumerate(passages))
    messages = [{"role": "user", "content": READER.format(passages=text, q=question)}]
    out = executive.complete(messages, max_tokens=max_tokens)
    return out.strip(), {"passages": [p.get("chunk_id", p["doc_id"]) for p in passages], "messages": messages,
                         "output": out}


def gold_subquestion(text: str, earlier: list[str]) -> str:
    """A MuSiQue decomposition step as a question for the memory: "#1" becomes the first answer, and the
    knowledge-graph form "Kris Benson >> member of sports team" becomes "What is the member of sports
    team of Kris Benson?"."""
    for i, a in enumerate(earlier, start=1):
        text = text.replace(f"#{i}", a)
    if ">>" in text:
        subject, _, relation = text.partition(">>")
        text = f"What is the {relation.strip()} of {subject.strip()}?"
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith("?") else "?") if text else text


def short_answer(question: str, answer: str) -> str:
    """The memory answers in sentences; a chained step needs the entity: the first name, date or number
    the answer gives that the question does not already contain (else the whole answer)."""
    from memo.reflections import find_spans

    q = question.lower()
    for sp in find_spans(answer):
        if sp["text"].lower() not in q:
            return sp["text"]
    return answer.strip()


def gold_decomposition(q: Question, memory) -> tuple[str, dict]:
    """Ask the memory the gold sub-questions in order, substituting earlier answers; answer with the last."""
    from memo.executive import is_idk

    earlier: list[str] = []
    steps = []
    for d in q.decomposition:
        sub = gold_subquestion(d["question"], earlier)
        full = memory.ask([sub])[0]
        steps.append({"role": "memory", "question": sub, "answer": full, "gold": d.get("answer")})
        if is_idk(full):  # the chain breaks here: a later step would ask about "I don't know"
            return IDK_ANSWER, {"steps": steps, "memory_calls": len(steps), "broken_at": len(steps)}
        earlier.append(short_answer(sub, full))
        steps[-1]["short"] = earlier[-1]
    return (earlier[-1] if earlier else ""), {"steps": steps, "memory_calls": len(steps)}


# ---------------------------------------------------------------------------------------------------
# The harness: `memo eval`. Per-question rows are appended as they finish, so an interrupted run picks
# up where it stopped (same settings) instead of paying for every answer again.

def _settings(cfg, exec_cfg) -> dict:
    """What an answer depends on: a resumed run must not mix answers made under other settings."""
    keep = ("benchmark", "data", "limit", "noise", "distractors", "memory", "memory_url", "domain", "executive_url",
            "executive_model", "executive_local", "bm25_k", "chunk_words", "reader_max_tokens")
    return {**{k: getattr(cfg, k) for k in keep}, **asdict(exec_cfg)}


def _open_run(cfg, exec_cfg, out: Path) -> dict[tuple[str, str], dict]:
    """Rows already done in OUT for these settings; an OUT written with other settings is refused."""
    settings_file = out / "settings.json"
    settings = _settings(cfg, exec_cfg)
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        if before != settings:
            diff = ", ".join(sorted(k for k in settings if before.get(k) != settings[k]))
            raise MemoError(f"--out {out}: holds a run with other settings ({diff}); use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2))
    done = {}
    pred = out / "predictions.jsonl"
    if pred.exists():
        for line in pred.read_text().splitlines():
            try:
                row = json.loads(line)
                done[(row["method"], row["qid"])] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that question is simply redone
    return done


def _memory_client(cfg, docs: list[Document], out: Path, exec_cfg, progress):
    """The memory the memo_* methods question: a router, a registered/local model, or one built here."""
    from memo import registry
    from memo.executive import HttpMemory, LocalMemory, load_memory

    if cfg.memory_url:
        import os

        return HttpMemory(cfg.memory_url, cfg.domain, os.environ.get("MEMO_API_KEY"), exec_cfg.memory_max_tokens,
                          exec_cfg.memory_temperature), f"{cfg.memory_url} ({cfg.domain})"
    if cfg.memory:
        mem = load_memory(cfg.memory, exec_cfg.memory_max_tokens, exec_cfg.memory_temperature)
        return mem, mem.version
    # No memory given: build one for this corpus with the platform's own stages.
    from memo.config import SynthesizeConfig, TrainConfig, build_config
    from memo.corpus import corpus_hash
    from memo.memory import materialize_full_model, train
    from memo.reflections import synthesize
    from memo.runtime import init_ray

    corpus = out / "corpus.jsonl"
    write_corpus(docs, corpus)
    domain = cfg.domain or f"{cfg.benchmark}-{corpus_hash(docs)[:8]}"
    progress(f"[eval] building the memory for {len(docs)} documents as memo-{domain} (synthesize + train)")
    init_ray()
    reflections = out / "reflections"
    synthesize(build_config(SynthesizeConfig, {"domain": domain, "corpus": str(corpus), "out": str(reflections)}))
    result = train(build_config(TrainConfig, {"domain": domain, "reflections": str(reflections),
                                              **cfg.train_overrides}))
    mem = LocalMemory(str(materialize_full_model(Path(result["model_dir"]))), exec_cfg.memory_max_tokens,
                      exec_cfg.memory_temperature)
    mem.version = f"models:/{registry.registered_name(domain)}/{result['version']}" if result.get("version") \
        else result["model_dir"]
    return mem, mem.version


def _answer(method: str, q: Question, ctx: dict) -> tuple[str, dict]:
    from memo import executive as ex

    executive, cfg = ctx["executive"], ctx["cfg"]
    if method == "closed_book":
        out = ex.closed_book(q.question, executive, cfg.reader_max_tokens)
        return out.strip(), {"prompt": ex.CLOSED_BOOK.format(q=q.question), "output": out}
    if method == "bm25":
        return read_passages(q.question, ctx["bm25"].search(q.question, cfg.bm25_k), executive, cfg.reader_max_tokens)
    if method == "oracle":
        gold = [ctx["docs"][d] for d in q.gold_doc_ids if d in ctx["docs"]]
        passages = [{"doc_id": d.doc_id, "title": d.title, "text": d.text} for d in gold]
        return read_passages(q.question, passages, executive, cfg.reader_max_tokens)
    if method == "memo_gold_decomp":
        return gold_decomposition(q, ctx["memory"])
    exec_cfg = dataclasses.replace(ctx["exec_cfg"], protocol="structured" if method == "memo_structured" else "single")
    tr = ex.answer_question(q.question, executive, ctx["memory"], exec_cfg)
    return tr.answer, asdict(tr)


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
                 "executive_tokens_per_q": round(sum(r["executive_tokens"] for r in rs) / k, 1), "n": k}
        if all(r.get("judge") is not None for r in rs):
            entry["judge"] = round(sum(r["judge"] for r in rs) / k, 4)
        out["methods"][m] = entry
    return out


def markdown_table(results: dict) -> str:
    has_judge = any("judge" in v for v in results["methods"].values())
    head = "| method | EM | F1 | contains |" + (" judge |" if has_judge else "") + \
        " memory calls/q | latency s/q | executive tokens/q |"
    lines = [f"{results['benchmark']}: {results['n']} questions", "", head,
             "|---" * (head.count("|") - 1) + "|"]
    for m, v in results["methods"].items():
        judge = f" {v['judge']:.3f} |" if has_judge else ""
        if has_judge and "judge" not in v:
            judge = " - |"
        lines.append(f"| {m} | {v['em']:.3f} | {v['f1']:.3f} | {v['contains']:.3f} |{judge} "
                     f"{v['memory_calls_per_q']:.1f} | {v['latency_s_per_q']:.1f} | {v['executive_tokens_per_q']:.0f} |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    metrics = ["em", "f1", "contains"] + (["judge"] if all("judge" in v for v in results["methods"].values()) else [])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(names))], [results["methods"][n][metric] for n in names], width,
               label=metric.upper() if metric != "contains" else "contains")
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))], names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title(f"{results['benchmark']} ({results['n']} questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(cfg, exec_cfg=None, progress=print) -> dict:
    """`memo eval`: answer every question with every method, score, write OUT, log to MLflow."""
    import os

    from memo import executive as ex
    from memo.config import ExecutiveConfig
    from memo.memory import contains_reference

    exec_cfg = exec_cfg or ExecutiveConfig()
    out = Path(cfg.out)
    docs, questions = load_benchmark(cfg.benchmark, cfg.data, cfg.limit, cfg.noise, cfg.distractors)
    done = _open_run(cfg, exec_cfg, out)

    executive = ex.make_executive(cfg.executive_url or None, cfg.executive_model or None,
                                  os.environ.get("MEMO_EXECUTIVE_API_KEY"), cfg.executive_local)
    judge = ex.OpenAILLM(cfg.judge_url, cfg.judge_model, os.environ.get("MEMO_JUDGE_API_KEY")) if cfg.judge_url \
        else None
    ctx = {"cfg": cfg, "executive": executive, "exec_cfg": exec_cfg, "docs": {d.doc_id: d for d in docs}}
    pending = [(m, q) for m in cfg.methods for q in questions if (m, q.qid) not in done]
    if "bm25" in cfg.methods:
        ctx["bm25"] = BM25Index(passages_of(docs, cfg.chunk_words))
    memory_label = None
    if any(m.startswith("memo_") for m, _ in pending):
        ctx["memory"], memory_label = _memory_client(cfg, docs, out, exec_cfg, progress)
    progress(f"[eval] {cfg.benchmark}: {len(questions)} questions over {len(docs)} documents; methods "
             f"{', '.join(cfg.methods)}; {len(done)} answers already in {out}, {len(pending)} to go")
    (out / "traces").mkdir(exist_ok=True)
    t_start = time.time()
    with open(out / "predictions.jsonl", "a") as pred_f:
        for i, (method, q) in enumerate(pending, 1):
            refs = [q.answer] + q.aliases
            e0, m0 = ex.usage_of(executive), ex.usage_of(ctx.get("memory"))
            t0 = time.time()
            try:
                prediction, trace = _answer(method, q, ctx)
                error = None
            except MemoError:
                raise
            except Exception as e:  # one failing question (a timeout, a server error) must not end the run
                prediction, trace, error = "", {}, f"{type(e).__name__}: {e}"
            latency = time.time() - t0
            e1, m1 = ex.usage_of(executive), ex.usage_of(ctx.get("memory"))
            memory_calls = trace.get("memory_calls", m1[0] - m0[0]) if method.startswith("memo_") else 0
            row = {"method": method, "qid": q.qid, "question": q.question, "reference": q.answer,
                   "aliases": q.aliases, "prediction": prediction, "em": exact_match(prediction, refs),
                   "f1": round(f1(prediction, refs), 4), "contains": float(contains_reference(prediction, refs)),
                   "judge": judge_correct(judge, q.question, refs, prediction) if judge and not error else None,
                   "memory_calls": memory_calls, "executive_calls": e1[0] - e0[0],
                   "executive_tokens": e1[1] - e0[1], "memory_tokens": m1[1] - m0[1],
                   "latency_s": round(latency, 3), "error": error}
            with open(out / "traces" / f"{method}.jsonl", "a") as tf:
                tf.write(json.dumps({"qid": q.qid, "method": method, **trace}, default=str) + "\n")
            pred_f.write(json.dumps(row) + "\n")
            pred_f.flush()
            done[(method, q.qid)] = row
            rate = (time.time() - t_start) / i
            progress(f"[eval] {i}/{len(pending)} {method:<17} em={row['em']:.0f} f1={row['f1']:.2f} "
                     f"{latency:5.1f}s  eta {rate * (len(pending) - i):.0f}s" + (f"  ERROR {error}" if error else ""))
    rows = [r for r in done.values() if r["method"] in cfg.methods]
    results = summarize(rows, cfg.methods, cfg.benchmark, len(questions))
    results.update({"memory": memory_label or cfg.memory or None,
                    "executive": cfg.executive_model or cfg.executive_local,
                    "documents": len(docs), "errors": sum(1 for r in rows if r.get("error"))})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    bar_chart(results, out / "results.png")
    results["mlflow_run_id"] = _log_to_mlflow(cfg, exec_cfg, results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    progress(markdown_table(results))
    return results


def _log_to_mlflow(cfg, exec_cfg, results: dict, out: Path) -> str:
    from mlflow.entities import Metric

    from memo import registry

    c = registry.client()
    run = c.create_run(registry.experiment_id("memo-eval"), run_name=f"{cfg.benchmark}-{time.strftime('%Y%m%d-%H%M%S')}",
                       tags={"memo.stage": "eval", "memo.benchmark": cfg.benchmark,
                             "memo.memory": str(results.get("memory"))})
    from mlflow.entities import Param

    params = {**_settings(cfg, exec_cfg), "methods": ",".join(cfg.methods)}
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
