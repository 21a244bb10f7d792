"""Ray Serve: one app with an OpenAI-compatible router, the memory deployments and the executive.

    Router (ingress) --- model "<domain>" ----------> MemoryModel (multiplexed <domain>:<version>)
                     \\-- model "memo/<d1>+<d2>" ----> ExecutiveModel --handles--> MemoryModel

`import_path: memo.serving:build_app` in a serve config (serve_configs/, cluster/kuberay/); `memo serve`
and the tests call `run`.
"""

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from memo.config import ServeConfig, build_config, memo_home, tracking_uri
from memo.errors import MemoError
from memo.serving.executive import ExecutiveModel
from memo.serving.memory import MemoryModel
from memo.serving.router import VERSION_HEADER, Router
from memo.tenants import load_tenants

__all__ = ["VERSION_HEADER", "ExecutiveModel", "MemoryModel", "Router", "build_app", "run"]
log = logging.getLogger(__name__)


def build_app(args: dict[str, Any]):
    """Serve app builder: `args` = ServeConfig fields.

    Runs where the app is built (`serve run` in the repo, or the cluster for `serve deploy`), so that
    is where a default project home is resolved to an absolute path.
    """
    cfg = build_config(ServeConfig, dict(args or {}), "serve config args")
    cfg.memo_home = str(Path(cfg.memo_home).resolve()) if cfg.memo_home else str(memo_home())
    if not cfg.tracking_uri:
        os.environ["MEMO_HOME"] = cfg.memo_home
        cfg.tracking_uri = tracking_uri()
    if cfg.tenants_file:
        cfg.tenants_file = str(Path(cfg.tenants_file).resolve())
        load_tenants(cfg.tenants_file)  # a bad tenants file fails here, before any replica starts
    args_ = cfg.model_dump()
    actor = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}
    dedicated = [MemoryModel.options(
        name=f"MemoryModel-{d}", ray_actor_options=actor,
        autoscaling_config={"min_replicas": cfg.dedicated_min_replicas, "max_replicas": cfg.dedicated_max_replicas,
                            "target_ongoing_requests": cfg.max_batch_size}).bind(args_)
        for d in cfg.dedicated_domains]
    memory = MemoryModel.options(ray_actor_options=actor).bind(args_)
    executive = ExecutiveModel.options(num_replicas=cfg.executive_replicas,
                                       ray_actor_options={"num_cpus": cfg.executive_cpus}).bind(
        args_, memory, *dedicated) if cfg.serve_executive else None
    return Router.bind(memory, executive, args_, *dedicated)


APP = "memo"


def startup_error(message: str) -> str:
    """One line out of Serve's DEPLOY_FAILED message (a replica's whole traceback): our own MemoError's
    text when the constructor raised one (e.g. llama-server's exit code and log tail), else its last line."""
    ours = re.findall(r"MemoError: (.+)", message)
    if ours:
        return ours[-1].strip()
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def wait_running(timeout_s: float, poll_s: float = 0.5) -> None:
    """Until the app runs; a MemoError naming the deployment and the reason when a replica failed to start
    (Serve gives up after max_constructor_retry_count tries) or nothing ran within `timeout_s` (e.g. no CPUs
    free for a replica: Serve's own message says what each replica needs and what is available)."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        failed = app is not None and app.status == ApplicationStatus.DEPLOY_FAILED
        if failed or time.monotonic() > deadline:
            bad = [(name, d) for name, d in (app.deployments.items() if app else [])
                   if d.status != DeploymentStatus.HEALTHY]
            why = "; ".join(f"{name}: {startup_error(d.message)}" for name, d in bad if d.message)
            why = why or (startup_error(app.message) if app and app.message else "no reason given")
            verb = "failed to start" if failed else f"did not start within {timeout_s:g} s (serve start_timeout_s)"
            raise MemoError(f"Serve app {APP!r} {verb}: {why}")
        time.sleep(poll_s)


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port (loopback by default) and deploy the app; returns the base URL.

    Bounded: a deployment that cannot start is a MemoError within cfg.start_timeout_s, and the app is
    deleted first, so nothing of it keeps holding CPUs."""
    # Per-request access lines would bury the caller's own output; errors still reach the driver.
    quiet_logs = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet_logs)
    try:
        # run_many without waiting, then our own bounded wait: serve.run waits for RUNNING without limit.
        serve.run_many([serve.RunTarget(build_app(cfg.model_dump()), name=APP, route_prefix="/",
                                        logging_config=quiet_logs)], wait_for_applications_running=False)
        wait_running(cfg.start_timeout_s)
    except BaseException:
        try:
            serve.delete(APP)
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.warning("memo serve: could not delete the app after a failed start: %s", e)
        raise
    if blocking:
        while True:  # as serve.run(blocking=True): until the process is stopped
            time.sleep(10)
    return f"http://{cfg.host}:{cfg.port}"
