"""Can the cluster place the training workers? Asked before `TrainerV2.fit()`, which otherwise waits.

Ray Train 2.60 retries a worker group that cannot be placed forever (its `controller_failure_limit`
defaults to -1, each try a 60 s start-up timeout), so `memo train --workers 8` on a 2-CPU cluster, or on
one whose CPUs a Serve app holds, would sit idle with no word. Here instead:

- a request larger than the whole cluster (CPUs or GPUs over all alive nodes) is a MemoError at once
  naming both numbers, unless `train.autoscaling` says nodes come on demand;
- a request the cluster could hold but whose resources are taken waits for them at most
  `train.startup_timeout_s` (a placement group of the same shape as Ray Train's), then is a MemoError
  naming what is free and which actors hold the rest (a Serve app's replicas, another training run).

The placement group is removed before `fit()` starts, so Ray Train places its own; the remaining race
(someone takes the resources in between) is bounded by the worker-group start-up timeout and the
controller failure limit set in `memo.training.stage`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from memo.errors import MemoError

log = logging.getLogger(__name__)


def state_address() -> str:
    """This driver's cluster, for Ray's state API: left to itself it looks for "the" local cluster and
    refuses when a machine runs two (a test session beside a CI run, two users' local jobs)."""
    import ray

    return ray.get_runtime_context().gcs_address


def stop_training_runs(interrupted: bool = True) -> int:
    """Kill the Ray Train controllers this driver started, running or finished (their workers go with
    them: Ray ties an actor's fate to its owner) and, for an `interrupted` run, its placement group;
    returns how many controllers were alive. Other jobs' runs are left alone. A finished controller
    holds no CPU but a process of ~200 MB that outlives fit(), so train() stops it too."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    try:
        # Not only ALIVE: a run cut off within its first seconds has a controller still being created
        # (PENDING_CREATION: its process starting, ~5-10 s on a busy 2-core box), which would come up
        # after this and start its workers (seen in CI: the next module found it).
        controllers = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "!=", "DEAD"),
                                           ("job_id", "=", job)], address=state_address(),
                                  raise_on_missing_output=False)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "!=", "DEAD"),
                                       ("job_id", "=", job)], address=state_address(),
                                  raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - best effort while an error is already on its way up
        log.warning("[train] could not list the training controllers to stop them: %s", e)
        return 0
    # ray.kill wants a handle, and fit() keeps the controller's handle to itself (its actor is unnamed):
    # the core worker's kill by id is what ray.kill calls underneath.
    from ray._raylet import ActorID

    core = ray._private.worker.global_worker.core_worker
    for c in controllers:
        try:
            core.kill_actor(ActorID.from_hex(c.actor_id), True)
        except Exception as e:  # noqa: BLE001
            log.warning("[train] could not stop training controller %s: %s", c.actor_id, e)
    if controllers:
        wait_until_dead({c.actor_id for c in controllers} | {w.actor_id for w in workers}, job)
    if interrupted and controllers:
        # An interrupted run's placement group outlives its controller (Ray Train's detached cleaner was
        # seen to leave it for minutes), holding the workers' CPUs: remove this job's unnamed groups
        # (Ray Train does not name its own; Serve's carry names).
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        from ray.util.state import list_placement_groups

        try:
            for pg in list_placement_groups(filters=[("creator_job_id", "=", job)], address=state_address(),
                                            raise_on_missing_output=False):
                if not pg.name and str(pg.state) in ("CREATED", "PENDING", "RESCHEDULING"):
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg.placement_group_id)))
        except Exception as e:  # noqa: BLE001
            log.warning("[train] could not remove the stopped run's placement group: %s", e)
        log.info(f"[train] stopped the interrupted training run ({len(workers)} worker(s) were running)")
    return len(controllers)


def wait_until_dead(actor_ids: set[str], job: str, timeout_s: float = 15.0) -> None:
    """Return once Ray reports every one of `actor_ids` dead, or after `timeout_s` (with a warning).

    A kill is asynchronous: the GCS lists a killed controller as not yet dead for a moment, so a caller
    that goes on at once, such as the next job or the next test module, could find the run still there
    and its CPUs still held."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    alive = set(actor_ids)
    while alive:
        try:
            listed = list_actors(filters=[("state", "!=", "DEAD"), ("job_id", "=", job)], limit=1000,
                                 address=state_address(), raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001 - best effort: the kill itself was sent
            log.warning("[train] could not check that the stopped run's actors exited: %s", e)
            return
        alive = {a.actor_id for a in listed} & alive
        if not alive:
            return
        if time.monotonic() > deadline:
            log.warning(f"[train] {len(alive)} actor(s) of the stopped run still alive after {timeout_s:g} s: "
                        f"{sorted(alive)}")
            return
        time.sleep(0.25)


def worker_bundle(use_gpu: bool, cpus_per_worker: float = 1.0) -> dict[str, float]:
    """What one Ray Train worker asks for (the ScalingConfig of memo.training.stage)."""
    return {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def holders(resource: str, limit: int = 4) -> str:
    """Which alive actors hold `resource`, grouped by class ('ServeReplica:memo:MemoryModel x1 (1 CPU)'),
    from Ray's state API; '' when it cannot say."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000, address=state_address(),
                             raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - an explanation only: never fail the check because of it
        log.debug("state API unavailable: %s", e)
        return ""
    held: Counter = Counter()
    count: Counter = Counter()
    for a in actors:
        amount = float((a.required_resources or {}).get(resource, 0))
        if amount > 0:
            name = a.class_name or "actor"
            held[name] += amount
            count[name] += 1
    parts = [f"{name} x{count[name]} ({held[name]:g} {resource})" for name, _ in held.most_common(limit)]
    return ", ".join(parts)


def check_placement(workers: int, use_gpu: bool, timeout_s: float, autoscaling: bool = False,
                    cpus_per_worker: float = 1.0) -> float:
    """Raise a MemoError when `workers` workers cannot be placed (at once, or after `timeout_s` of waiting);
    return the seconds waited."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_bundle(use_gpu, cpus_per_worker)
    total = ray.cluster_resources()
    for resource, each in bundle.items():
        need, have = each * workers, float(total.get(resource, 0))
        if need > have and not autoscaling:
            raise MemoError(f"train.workers={workers} needs {need:g} {resource} ({each:g} per worker) but the Ray "
                            f"cluster has {have:g} {resource} in all; use --workers {max(1, int(have // each))} or "
                            "fewer, add nodes, or set train.autoscaling=true on a cluster that adds nodes on demand")
    free = ray.available_resources()
    if all(float(free.get(r, 0)) >= each * workers for r, each in bundle.items()):
        return 0.0
    short = next(r for r, each in bundle.items() if float(free.get(r, 0)) < each * workers)
    who = holders(short)
    log.info(f"[train] waiting up to {timeout_s:g} s for {workers} worker(s) of {bundle}: "
             f"{float(free.get(short, 0)):g} of {float(total.get(short, 0)):g} {short} free"
             + (f"; held by {who}" if who else ""))
    t0 = time.monotonic()
    pg = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(pg)
    waited = time.monotonic() - t0
    if not ready:
        free = ray.available_resources()
        who = holders(short) or who
        raise MemoError(f"train.workers={workers} needs {bundle.get(short, 0) * workers:g} {short} "
                        f"({bundle.get(short, 0):g} per worker); {float(free.get(short, 0)):g} of "
                        f"{float(ray.cluster_resources().get(short, 0)):g} stayed free for {timeout_s:g} s "
                        f"(train.startup_timeout_s)" + (f"; held by {who}" if who else "")
                        + ". Stop what holds them (e.g. `serve shutdown`), lower --workers or raise "
                          "train.startup_timeout_s")
    return waited


# Ray Train keeps CheckpointConfig(num_to_keep=2) checkpoints (memo.training.stage) and writes the next one
# before it drops the oldest; each is first written in the worker's temporary folder, then copied.
CHECKPOINTS_ON_DISK = 2 + 2


def check_checkpoint_space(n_params: float, finetune: str, storage, free_bytes: int | None = None) -> None:
    """A run whose checkpoints cannot fit where they go is an error now, naming the numbers, not a "No space
    left on device" in a worker after minutes of training (then retried from scratch, max_failures times).

    A checkpoint holds the weights in fp32 (4 bytes per parameter) and, for full SFT, AdamW's two fp32
    moments (8 more); a LoRA run's optimizer state is negligible. The final export adds one copy of the
    weights. Measured: a 0.5B full-SFT run filled this project's 40 GB of free disk at its first checkpoint."""
    import shutil
    from pathlib import Path

    per = n_params * (12 if finetune == "full" else 4)
    need = CHECKPOINTS_ON_DISK * per + 4 * n_params
    path = Path(storage)
    while not path.exists():  # the run folder is created later: ask the disk it will be on
        path = path.parent
    free = shutil.disk_usage(path).free if free_bytes is None else free_bytes
    if need > free:
        raise MemoError(f"training {n_params / 1e6:.0f}M parameters ({finetune}) writes checkpoints of "
                        f"~{per / 1e9:.1f} GB; {CHECKPOINTS_ON_DISK} of them at once plus the export need "
                        f"~{need / 1e9:.0f} GB under {storage}, which has {free / 1e9:.0f} GB free: free space, put "
                        "MEMO_HOME on a bigger disk, or use --finetune lora")
