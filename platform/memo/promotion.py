"""Promotion with a gate, and rollback.

`memo promote --from candidate --to champion` scores both versions on the same evaluation set and
refuses when the candidate is worse than the current champion by more than a margin. The set is the
held-out paraphrases each version kept out of its training (`heldout.jsonl` in the model folder, see
`training.data.split_heldout`) plus any QA files given: questions the memory was never trained on verbatim.
A forced promotion and every refusal are logged to MLflow; every alias move is in the audit trail.
"""

from __future__ import annotations

import json
import logging
import time

from memo import registry
from memo.errors import GateRefused, MemoError
from memo.engines.memory import MemoryEngine
from memo.training.checks import load_eval_items, score_items

log = logging.getLogger(__name__)


def evaluate_version(domain: str, version: str, items: list[dict], max_new_tokens: int = 48) -> dict:
    """Ask one registered version every question (fresh single-turn chats, batched) and score it."""
    memory = MemoryEngine(registry.download_version(domain, version))
    scores, answers = score_items(memory, items, max_new_tokens)
    memory.close()
    return {"version": version, "score": sum(scores) / max(len(scores), 1), "n": len(scores),
            "answers": answers}


def heldout_items(domain: str, versions: list[str]) -> list[dict]:
    """The union of the versions' held-out paraphrases (deduplicated by question)."""
    seen, items = set(), []
    for v in versions:
        f = registry.download_version(domain, v) / "heldout.jsonl"
        if f.exists():
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if r["question"] not in seen:
                    seen.add(r["question"])
                    items.append({"question": r["question"], "answer": r["answer"], "aliases": []})
    return items


def promote(domain: str, to_alias: str, from_alias: str = "candidate", version: str | None = None,
            qa_files: list[str] | None = None, margin: float = 0.05, force: bool = False, reason: str = "",
            ) -> dict:
    """Move `to_alias` to the candidate version if it passes the gate (or `force`); returns a report."""
    candidate = version or registry.resolve_version(domain, from_alias)
    registry.client().get_model_version(registry.registered_name(domain), candidate)  # exists?
    extra = load_eval_items(qa_files or [])  # bad files fail before anything is evaluated
    try:
        current = registry.resolve_version(domain, to_alias)
    except MemoError:
        current = None
    report = {"domain": domain, "alias": to_alias, "candidate": candidate, "current": current, "forced": force,
              "margin": margin, "gate": "skipped"}
    if current == candidate:
        log.info(f"memo-{domain}: {to_alias!r} already points at version {candidate}; nothing to do")
        return {**report, "gate": "no-op", "previous": current}
    if current is not None:
        items = heldout_items(domain, [candidate, current]) + extra
        if not items:
            log.info("[promote] no evaluation set (no held-out paraphrases, no --qa): the gate cannot compare")
            if not force:
                raise MemoError(f"memo-{domain}: no evaluation set to compare v{candidate} with v{current}; "
                                "give --qa FILE.jsonl or --force")
        else:
            log.info(f"[promote] gate: scoring v{candidate} ({from_alias if not version else 'given'}) and "
                     f"v{current} ({to_alias}) on {len(items)} held-out questions")
            cand, champ = evaluate_version(domain, candidate, items), evaluate_version(domain, current, items)
            report.update(candidate_score=round(cand["score"], 4), current_score=round(champ["score"], 4),
                          n=len(items), gate="passed" if cand["score"] >= champ["score"] - margin else "failed")
            log.info(f"[promote] v{candidate}: {cand['score']:.3f}   v{current}: {champ['score']:.3f}   "
                     f"(margin {margin}) -> {report['gate']}")
    _log(domain, report)
    if report["gate"] == "failed" and not force:
        raise GateRefused(f"memo-{domain}: promotion refused: candidate v{candidate} scores "
                        f"{report['candidate_score']:.3f} vs {to_alias} v{current} {report['current_score']:.3f} on "
                        f"{report['n']} held-out questions (allowed margin {margin}); --force overrides (logged)")
    why = reason or f"promoted from {from_alias if not version else 'version ' + candidate}"
    if force and report["gate"] == "failed":
        why = f"FORCED past a failed gate ({report['candidate_score']:.3f} < {report['current_score']:.3f}): {why}"
    previous = registry.set_alias(domain, to_alias, candidate, reason=why)
    log.info(f"memo-{domain}: alias {to_alias!r} -> version {candidate}"
             + (f" (was version {previous})" if previous else " (new alias)"))
    return {**report, "previous": previous}


def rollback(domain: str, alias: str = "champion") -> dict:
    """Point `alias` back at the version it held before its last move."""
    current = registry.resolve_version(domain, alias)
    target = registry.previous_version(domain, alias)
    registry.set_alias(domain, alias, target, reason=f"rollback from version {current}")
    _log(domain, {"domain": domain, "alias": alias, "candidate": target, "current": current, "gate": "rollback"})
    log.info(f"memo-{domain}: alias {alias!r} rolled back to version {target} (was version {current})")
    return {"domain": domain, "alias": alias, "version": target, "previous": current}


def _log(domain: str, report: dict) -> None:
    """One MLflow run per promotion decision, next to the training runs of the domain."""
    run_id = registry.start_run(domain, "promote", {k: v for k, v in report.items() if not isinstance(v, float)})
    c = registry.client()
    for k in ("candidate_score", "current_score"):
        if k in report:
            c.log_metric(run_id, k, report[k], timestamp=int(time.time() * 1000))
    registry.end_run(run_id)
