"""Step 3, verification: a judge checks each pair of steps 1-2 for self-containment (a rule check sits
under it as a floor); a failing pair is rewritten from its source chunk and re-judged, up to
`verify_attempts` times, then discarded. The input row is one pair plus its source chunk."""

from __future__ import annotations

from memo.synthesis.llm.prompts import JUDGE_MAX_TOKENS, prompt_judge, prompt_rewrite
from memo.synthesis.llm.rows import check_pair, row, text
from memo.synthesis.questions import check_self_contained


def run(w, records, usage):
    cur = [(r["question"], r["answer"]) for r in records]
    status: list[str] = ["pending"] * len(records)
    last: list[str] = [""] * len(records)
    rewritten = [False] * len(records)
    for attempt in range(w.verify_attempts):
        pending = [i for i, s in enumerate(status) if s == "pending"]
        if not pending:
            break
        # A verdict is a few tokens of JSON: capping it keeps a rambling judge from costing a whole reply.
        verdicts = w.ask([prompt_judge(*cur[i]) for i in pending], [usage[i] for i in pending],
                         min(w.max_tokens, JUDGE_MAX_TOKENS))
        failing = []
        for i, (obj, err, raw) in zip(pending, verdicts):
            rule = check_self_contained(*cur[i])  # a deterministic floor under the judge
            violations = [v for v in (obj or {}).get("violations", []) if isinstance(v, str)] if obj else []
            if obj is not None and obj.get("ok") is True and not rule and not violations:
                status[i] = "ok"
                continue
            last[i] = err or rule or ", ".join(violations) or "judge said not ok"
            if err.startswith(("engine_error", "too_long")):
                status[i] = "error"
                continue
            failing.append((i, violations + ([rule.replace(" ", "_")] if rule else [])))
        if attempt == w.verify_attempts - 1 or not failing:
            break
        fixes = w.ask([prompt_rewrite(records[i], *cur[i], v) for i, v in failing], [usage[i] for i, _ in failing])
        for (i, _v), (obj, err, raw) in zip(failing, fixes):
            q, a = text((obj or {}).get("question")), text((obj or {}).get("answer"))
            if obj is not None and not check_pair(q, a):
                cur[i], rewritten[i] = (q, a), True
            elif err.startswith(("engine_error", "too_long")):
                status[i], last[i] = "error", err
    out = []
    for i, rec in enumerate(records):
        q, a = cur[i]
        if status[i] == "ok":
            r = row(rec["input_id"], "ok", w.step, "rewritten" if rewritten[i] else "passed", q, a,
                    rec["source_chunk_ids"], rec["merged_from"], verified=True)
        else:
            reason = last[i] if status[i] == "error" else f"unverified after {w.verify_attempts} attempt(s): {last[i]}"
            r = row(rec["input_id"], "reject", w.step, rec["kind"], q, a, rec["source_chunk_ids"],
                    rec["merged_from"], reason=reason)
        out.append([r])
    return out
