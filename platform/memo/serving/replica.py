"""What every MeMo replica does first, whichever deployment it belongs to."""

from __future__ import annotations

import os

from memo.config import ServeConfig


def use_state_of(cfg: ServeConfig) -> None:
    """Point this replica at the project home the app was built with: replicas run in other working
    directories, where a relative MEMO_HOME (or MLflow's ./mlruns default) would find nothing."""
    os.environ["MEMO_HOME"] = cfg.memo_home
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
