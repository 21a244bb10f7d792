"""Process set-up shared by the CLI and the job scripts: logging, quiet libraries, Ray connection."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from memo.config import memo_home, tracking_uri

def cpu_flags() -> list[str]:
    """The CPU features that decide speeds here (bf16 matmul units, vector width), to state beside every
    number and to pick precision: machines of the same class differ (AVX2-only vs AVX-512-BF16)."""
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]


# Libraries whose INFO chatter (per request, per dataset, per migration) would bury our progress lines.
QUIET_LOGGERS = ("mlflow", "alembic", "ray", "ray.data", "urllib3", "httpx", "transformers", "filelock")


class _Stdout(logging.StreamHandler):
    """A handler on whatever sys.stdout is when a line is written (pytest and Ray Train swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def quiet() -> None:
    """Keep the user's terminal for progress lines: library warnings that need no action stay hidden."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")           # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # a version's download draws a progress bar per file on stderr, where a command's one error line goes
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Progress lines are the program's output: INFO from memo.* goes to stdout as plain lines, once.
    memo_log = logging.getLogger("memo")
    if not memo_log.handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        memo_log.addHandler(handler)
    memo_log.setLevel(logging.INFO)
    memo_log.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def interruptible(fn, on_interrupt, poll_s: float = 0.5):
    """fn() in a worker thread, waited for in short Python-level joins, so that any signal handler's
    exception (Ctrl-C's KeyboardInterrupt, SIGTERM, a time limit's SIGALRM) reaches this thread at once;
    then `on_interrupt()` runs (e.g. stop what fn started on the cluster) and the exception goes on.

    Why: a blocking ray.get in the main thread waits in C++, and Ray's own signal check there turns only
    KeyboardInterrupt into an interruption (measured: pytest-timeout's SIGALRM, and then even SIGINT,
    left Ray Train's fit() waiting for good)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    worker = threading.Thread(target=run, name=getattr(fn, "__name__", "interruptible"), daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(poll_s)
    except BaseException:
        on_interrupt()
        worker.join(30)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def init_ray(address: str | None = None):
    """Connect to RAY_ADDRESS (a cluster, or the job's own cluster under `ray job submit`), else start a
    local instance. MEMO_HOME and the tracking URI travel to every worker so all see the same state."""
    import ray

    if ray.is_initialized():
        return ray
    env = {"MEMO_HOME": str(memo_home()), "MLFLOW_TRACKING_URI": tracking_uri(), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # Ray Train re-routes print() through a logger that tees to stdout: every line twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    # "local" starts a fresh instance: without it ray.init() joins whatever cluster last ran on this
    # machine (/tmp/ray/ray_current_cluster), even a dead one, and waits for it.
    # The dashboard (on loopback) also serves the state API, which Ray Train's placement-group cleaner
    # polls; without it that thread logs a warning every few seconds and cannot clean up.
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        # Ray starts workers at nice 15; on a small dedicated box the training worker then loses CPU to
        # Ray's own daemons (measured: memo train 0.77x a plain loop at nice 15, 0.81-0.86x at 0).
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", runtime_env={"env_vars": env},
             logging_level=logging.WARNING, log_to_driver=True, configure_logging=True,
             **({"include_dashboard": True, "dashboard_host": "127.0.0.1"} if local else {}))
    # Ray Data logs an execution plan per dataset at INFO; our own progress lines say what matters.
    # ray.init(configure_logging=True) resets levels, so the quiet ones are set again here.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray
