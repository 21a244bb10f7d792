"""MLflow: tracking of every stage run, and the registry of memory versions per domain.

One registered model per domain (`memo-<domain>`); every version carries its lineage as tags; aliases
(`candidate`, `champion`, ...) are what deployments follow. State lives under MEMO_HOME unless
MLFLOW_TRACKING_URI points at a tracking server.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from memo.atomic import atomic_path
from memo.config import check_domain, memo_home, tracking_uri
from memo.errors import MemoError

_URI = re.compile(r"^models:/memo-(?P<domain>[a-z0-9_-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def registered_name(domain: str) -> str:
    return f"memo-{domain}"


def client():
    """An MlflowClient on the project's tracking URI (never MLflow's relative ./mlruns default)."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations chatter on first use
    memo_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (memo_home() / "mlartifacts").as_uri()  # absolute: runs never depend on the cwd
    return c.create_experiment(name, artifact_location=location)


# Runs this process started and has not ended: a stage that fails leaves its run here, and the process
# marks it FAILED with the error (fail_open_runs, from the CLI's error handler, and at exit for errors
# nothing handled) instead of leaving it RUNNING in the MLflow UI forever.
_open_runs: set[str] = set()


def start_run(domain: str, stage: str, params: dict) -> str:
    c = client()
    run = c.create_run(experiment_id(f"memo-{domain}"), run_name=f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                       tags={"memo.stage": stage, "memo.domain": domain})
    from mlflow.entities import Param

    flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in params.items()}
    c.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])
    if not _open_runs:
        atexit.register(fail_open_runs, "the process ended before the run finished")
    _open_runs.add(run.info.run_id)
    return run.info.run_id


def end_run(run_id: str) -> None:
    """The stage finished: FINISHED in MLflow."""
    client().set_terminated(run_id)
    _open_runs.discard(run_id)


def fail_run(run_id: str, error: str, status: str = "FAILED") -> None:
    """The stage failed: `status` (FAILED, or KILLED when interrupted) with the error's first line as the
    tag memo.error. Best effort: the registry may itself be what failed."""
    _open_runs.discard(run_id)
    try:
        c = client()
        c.set_tag(run_id, "memo.error", (error.strip().splitlines() or [""])[0][:500])
        c.set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001 - never hide the error being reported
        pass


def fail_open_runs(error: str, status: str = "FAILED") -> None:
    """Every run this process started and did not end, as fail_run."""
    for run_id in list(_open_runs):
        fail_run(run_id, error, status)


def log_reflections_input(run_id: str, df, source: str, digest: str, domain: str, synth: dict) -> None:
    """The reflections a training run used, as an MLflow dataset input (name, digest = the synthesize
    stage's dataset hash, source = the folder), plus the synthesize stage's per-step counts as metrics."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag, Metric

    cols = [c for c in ("id", "step", "question", "answer", "generator") if c in df.columns]
    with warnings.catch_warnings():  # a plain path resolves to a local source; MLflow warns that it guessed
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_pandas(df[cols], source=str(source), name=f"reflections-{domain}", digest=digest[:36])
    c = client()
    c.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                tags=[InputTag("mlflow.data.context", "training")])])
    now = int(time.time() * 1000)
    metrics = [Metric(f"synth.{step}.{k}", float(v), now, 0) for step, st in (synth.get("steps") or {}).items()
               for k, v in st.items() if k in ("in", "out", "rejected") and isinstance(v, (int, float))]
    metrics += [Metric(f"synth.rows.{k}", float(v), now, 0) for k, v in (synth.get("per_step") or {}).items()]
    if "rejected" in synth:
        metrics.append(Metric("synth.rejected", float(synth["rejected"]), now, 0))
    if metrics:
        c.log_batch(run_id, metrics=metrics)


def register_memory(domain: str, model_dir: str | Path, run_id: str, lineage: dict, alias: str | None) -> str:
    """Log the model folder to the run and create a new version of memo-<domain>; returns the version."""
    from mlflow.exceptions import MlflowException

    c = client()
    name = registered_name(domain)
    c.log_artifacts(run_id, str(model_dir), "memory")
    try:
        c.create_registered_model(name, tags={"memo.domain": domain},
                                  description=f"MeMo memory model for domain {domain!r}")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/memory"
    tags = {f"memo.{k}": (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in lineage.items()}
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    if alias:
        set_alias(domain, alias, mv.version)
    return str(mv.version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/memo-<domain>@<alias>` or `models:/memo-<domain>/<version>` -> (domain, alias, version)."""
    m = _URI.match(uri)
    if not m:
        raise MemoError(f"{uri!r}: expected models:/memo-<domain>@<alias> or models:/memo-<domain>/<version>")
    return m["domain"], m["alias"], m["version"]


def resolve_version(domain: str, alias: str) -> str:
    """The version an alias points at, with an error that lists what exists."""
    from mlflow.exceptions import MlflowException

    check_domain(domain)
    c = client()
    name = registered_name(domain)
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        try:
            rm = c.get_registered_model(name)
        except MlflowException:
            raise MemoError(f"--domain {domain}: unknown domain (no registered model {name}); "
                            f"known domains: {', '.join(list_domains()) or 'none yet'}") from None
        known = ", ".join(f"{a}->v{v}" for a, v in sorted(rm.aliases.items())) or "none"
        raise MemoError(f"{name}: no alias {alias!r} (aliases: {known})") from None


def set_alias(domain: str, alias: str, version: str, reason: str = "") -> str | None:
    """Point an alias at a version and append the move to the registered model's audit trail."""
    c = client()
    name = registered_name(domain)
    c.get_model_version(name, version)  # raises if the version does not exist
    rm = c.get_registered_model(name)
    previous = rm.aliases.get(alias)
    c.set_registered_model_alias(name, alias, version)
    trail = json.loads(rm.tags.get("memo.alias_history", "[]"))
    previous = None if previous is None else str(previous)
    trail.append({"alias": alias, "from": previous, "to": str(version), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "reason": reason})
    c.set_registered_model_tag(name, "memo.alias_history", json.dumps(trail[-50:]))
    return previous


def download_version(domain: str, version: str) -> Path:
    """A local folder holding the version's model; cached under MEMO_HOME so replicas reuse it."""
    import mlflow

    c = client()
    mv = c.get_model_version(registered_name(domain), version)
    dst = memo_home() / "cache" / registered_name(domain) / str(version)
    if (dst / "config.json").exists() or (dst / "adapter_config.json").exists():  # full or LoRA-adapter export
        return dst
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp)))
        if local != tmp:  # the artifact folder arrives inside tmp: make it the version folder itself
            for child in local.iterdir():
                shutil.move(str(child), tmp / child.name)
            shutil.rmtree(local)
    return dst


def list_domains() -> list[str]:
    return sorted(rm.name[len("memo-"):] for rm in client().search_registered_models()
                  if rm.name.startswith("memo-"))


def _merge_lineage(tags: dict) -> dict | None:
    """A merged version's inputs and method, from the tags `memo merge` wrote; None for a trained one."""
    if "memo.merge_inputs" not in tags:
        return None
    return {"inputs": json.loads(tags["memo.merge_inputs"]), "method": tags.get("memo.merge_method"),
            "density": tags.get("memo.merge_density"), "weights": json.loads(tags.get("memo.merge_weights", "[]"))}


def domain_status(domain: str) -> dict:
    c = client()
    name = registered_name(domain)
    rm = c.get_registered_model(name)
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    spans = serving_spans(domain, rm.tags)
    return {
        "domain": domain, "registered_model": name,
        "aliases": {a: str(v) for a, v in rm.aliases.items()},
        "versions": [{"version": v.version, "created": v.creation_timestamp, "run_id": v.run_id,
                      "base_model": v.tags.get("memo.base_model"), "rows": v.tags.get("memo.reflection_rows"),
                      "train_recall": v.tags.get("memo.train_recall"), "merge": _merge_lineage(v.tags)}
                     for v in versions],
        "alias_history": json.loads(rm.tags.get("memo.alias_history", "[]")),
        # what each replica serves now, and every span: (deployment, replica, version, since, until)
        "serving": {f"{s['deployment']}/{s['replica']}": {"version": s["version"], "since": s["since"]}
                    for s in spans if s["until"] is None},
        "serving_history": spans,
    }


# The serving audit: one registered-model tag per span, `memo.serving.span.<id>`, written only by the
# replica that owns the span (opened when it starts serving a version, closed when it serves another
# or shuts down). Replicas never read-modify-write a shared value, so concurrent replicas cannot
# overwrite each other's records; the registry itself stays the one place to look (any MLflow backend).
SPAN_TAG = "memo.serving.span."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _write_span(span: dict) -> None:
    client().set_registered_model_tag(registered_name(span["domain"]), SPAN_TAG + span["id"], json.dumps(span))


def open_serving_span(domain: str, deployment: str, replica: str, version: str) -> dict:
    """Record that `replica` of `deployment` starts serving `version` of `domain`; returns the span."""
    span = {"id": uuid.uuid4().hex[:16], "domain": domain, "deployment": deployment, "replica": replica,
            "version": str(version), "since": _now(), "until": None}
    _write_span(span)
    return span


def close_serving_span(span: dict) -> dict:
    span = {**span, "until": _now()}
    _write_span(span)
    return span


def serving_spans(domain: str, tags: dict | None = None) -> list[dict]:
    """Every serving span of `domain`, oldest first."""
    tags = tags if tags is not None else client().get_registered_model(registered_name(domain)).tags
    spans = [json.loads(v) for k, v in tags.items() if k.startswith(SPAN_TAG)]
    return sorted(spans, key=lambda s: (s["since"], s["id"]))


def previous_version(domain: str, alias: str) -> str:
    """The version `alias` pointed at before its last move (for rollback), from the audit trail."""
    rm = client().get_registered_model(registered_name(domain))
    moves = [h for h in json.loads(rm.tags.get("memo.alias_history", "[]")) if h["alias"] == alias]
    current = rm.aliases.get(alias)
    for h in reversed(moves):
        if h["from"] and str(h["from"]) != str(current):
            return str(h["from"])
    raise MemoError(f"{registered_name(domain)}: alias {alias!r} has no earlier version to roll back to")
