"""Ray Serve: one app with an OpenAI-compatible router, the memory deployments and the executive.

    Router (ingress) --- model "<domain>" ----------> MemoryModel (multiplexed <domain>:<version>)
                     \\-- model "memo/<d1>+<d2>" ----> ExecutiveModel --handles--> MemoryModel

`import_path: memo.serving:build_app` in a serve config (serve_configs/, cluster/kuberay/); `memo serve`
and the tests call `run`.
"""

import os
from pathlib import Path
from typing import Any

from ray import serve

from memo.config import ServeConfig, build_config, memo_home, tracking_uri
from memo.serving.executive import ExecutiveModel
from memo.serving.memory import MemoryModel
from memo.serving.router import VERSION_HEADER, Router
from memo.tenants import load_tenants

__all__ = ["VERSION_HEADER", "ExecutiveModel", "MemoryModel", "Router", "build_app", "run"]


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


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve on cfg.host:cfg.port (loopback by default) and deploy the app; returns the base URL."""
    # Per-request access lines would bury the caller's own output; errors still reach the driver.
    quiet_logs = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet_logs)
    serve.run(build_app(cfg.model_dump()), name="memo", route_prefix="/", blocking=blocking, logging_config=quiet_logs)
    return f"http://{cfg.host}:{cfg.port}"
