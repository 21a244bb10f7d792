"""`memo check`: the demo's check questions against a served domain, three ways side by side: the base
model answering closed-book, the memory's own answer, and MeMo (the executive questioning the memory).
MeMo is the served product by default (`model: memo/<domain>`: the router's executive deployment
questions the memory in-cluster); `--memo-answer local` runs the executive here against the raw memory.

The check questions are reworded, never the training reflections, and several need two documents.
Results go to MEMO_HOME/demo_results.json; the table goes to stdout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from memo.atomic import write_text
from memo.config import ExecutiveConfig, memo_home
from memo.corpus import read_jsonl
from memo.errors import MemoError, where
from memo.executive import answer_question, closed_book
from memo.executive.clients import HttpMemory, make_executive
from memo.text import contains_reference

log = logging.getLogger(__name__)


def load_questions(path: str) -> list[dict]:
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
    return contains_reference(prediction, [row["answer"], *row.get("aliases", [])])


class ServedMemo:
    """The router's MeMo answer (model memo/<domain>), in the shape the local protocol returns."""

    def __init__(self, url: str, domain: str, key: str | None):
        from openai import OpenAI

        self.client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=key or "none", timeout=600, max_retries=2)
        self.url, self.domain = url, domain

    def create(self, question: str, protocol: str):
        """The raw chat completion (with its trace); HTTP and connection errors as one-line MemoErrors."""
        import openai

        try:
            return self.client.chat.completions.create(
                model=f"memo/{self.domain}", messages=[{"role": "user", "content": question}],
                extra_body={"memo_protocol": protocol, "memo_trace": True})
        except openai.APIStatusError as e:
            raise MemoError(f"--url {self.url}: HTTP {e.status_code}: {e.message}") from None
        except openai.APIConnectionError:
            raise MemoError(f"--url {self.url}: no router answers there (start one with `memo serve`)") from None

    def answer(self, question: str, protocol: str):
        from types import SimpleNamespace

        r = self.create(question, protocol)
        x = r.model_extra
        calls = (x.get("memo_trace") or {}).get("memory_answers", [])
        return SimpleNamespace(answer=r.choices[0].message.content or "", memory_version=x.get("memo_version"),
                               memory_calls=x.get("memory_calls", 0),
                               seconds=(x.get("memo_trace") or {}).get("seconds", 0.0),
                               steps=[{"role": "memory", **c} for c in calls])


def run_checks(args, exec_cfg: ExecutiveConfig) -> dict:
    questions = load_questions(args.questions)
    # The served executive runs with its serve config's settings; only the protocol travels with a request.
    ignored = sorted(set(exec_cfg.model_dump(exclude_defaults=True)) - {"protocol"})
    if args.memo_answer == "served" and ignored:
        raise MemoError(f"executive settings {', '.join(ignored)}: the router's MeMo answer uses its serve "
                        "config's (executive_*); pass --memo-answer local to run the executive here with them")
    key = os.environ.get("MEMO_API_KEY")
    executive = make_executive(args.executive_url, args.executive_model, os.environ.get("MEMO_EXECUTIVE_API_KEY"),
                               args.executive_local)
    if args.memo_answer == "served":
        served = ServedMemo(args.url, args.domain, key)
        memo = lambda question: served.answer(question, exec_cfg.protocol)  # noqa: E731
    else:
        memory = HttpMemory(args.url, args.domain, key, exec_cfg.memory_max_tokens,
                            confidence_gate=exec_cfg.confidence_gate)
        memo = lambda question: answer_question(question, executive, memory, exec_cfg)  # noqa: E731
    rows, by_kind = [], {}
    for i, q in enumerate(questions, 1):
        cb = closed_book(q["question"], executive)
        tr = memo(q["question"])
        direct = next((s["answer"] for s in tr.steps if s["role"] == "memory" and s["question"] == q["question"]), "")
        ok = {"closed_book": matches(cb, q), "memory": matches(direct, q), "memo": matches(tr.answer, q)}
        kind = q.get("kind", "")
        for k, v in ok.items():
            by_kind.setdefault(kind, {}).setdefault(k, 0)
            by_kind[kind][k] += v
        by_kind[kind]["n"] = by_kind[kind].get("n", 0) + 1
        rows.append({"id": q.get("id"), "kind": kind, "question": q["question"], "reference": q["answer"],
                     "closed_book": cb, "memory_answer": direct, "memo": tr.answer, **{f"{k}_ok": v for k, v in ok.items()},
                     "memory_version": tr.memory_version, "memory_calls": tr.memory_calls, "seconds": tr.seconds,
                     # what the memory was asked and said, and each executive step's output (prompts left out)
                     "trace": [{k: v for k, v in st.items() if k != "messages"} for st in tr.steps]})
        mark = {True: "OK", False: "x"}
        log.info(f"\n[{i}/{len(questions)}] ({kind}) {q['question']}\n"
                 f"  reference:    {q['answer']}\n"
                 f"  closed-book:  {cb}  {mark[ok['closed_book']]}\n"
                 f"  memory said:  {direct}  {mark[ok['memory']]}\n"
                 f"  MeMo answer:  {tr.answer}  {mark[ok['memo']]}   (memo-{args.domain} v{tr.memory_version}, "
                 f"{tr.memory_calls} memory calls, {tr.seconds:.1f} s)")
    n = len(rows)
    total = {k: sum(r[f"{k}_ok"] for r in rows) for k in ("closed_book", "memory", "memo")}
    summary = {"domain": args.domain, "version": rows[0]["memory_version"] if rows else None, "questions": n,
               "closed_book_correct": total["closed_book"], "memory_direct_correct": total["memory"],
               "memo_correct": total["memo"], "by_kind": by_kind, "protocol": exec_cfg.protocol,
               "memo_answer": args.memo_answer}
    out = memo_home() / "demo_results.json"
    write_text(out, json.dumps({"summary": summary, "rows": rows}, indent=2))
    log.info(f"\nclosed-book executive: {total['closed_book']}/{n} correct;  MeMo (executive + memory): "
             f"{total['memo']}/{n} correct;  the memory's own answer to the question: {total['memory']}/{n}")
    for kind, c in sorted(by_kind.items()):
        log.info(f"  {kind or 'all'}: closed-book {c['closed_book']}/{c['n']}, memory {c['memory']}/{c['n']}, "
                 f"MeMo {c['memo']}/{c['n']}")
    log.info(f"details: {out}")
    return summary
