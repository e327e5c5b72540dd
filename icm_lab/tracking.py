"""Experiment tracking. Results are always written to disk first; a tracker mirrors them.

Built from `conf/logger/*.yaml` through `_target_` (a partial: the run adds its directory,
config, name and group). `logger=none` tracks nothing. `logger=wandb` logs to Weights & Biases,
one run per job, grouped by sweep in a multirun. With no API key (or WANDB_MODE=offline) the
run is written offline, and the run says so once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import wandb

log = logging.getLogger(__name__)


class Tracker:
    """The no-op tracker (`logger=none`)."""

    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None = None):
        pass

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None = None,
                 project: str = "icm_lab", entity: str | None = None, mode: str | None = None):
        self.wandb = wandb
        mode = mode or os.environ.get("WANDB_MODE")
        if mode is None and not _has_wandb_key():
            mode = "offline"
            log.warning("W&B: no API key found, logging offline to %s/wandb "
                        "(sync later with `wandb sync`)", run_dir)
        self.run = wandb.init(project=project, entity=entity, group=group, name=name,
                              dir=str(run_dir), mode=mode, reinit="finish_previous", config=config)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    def log_images(self, images: dict[str, Path]) -> None:
        self.run.log({key: self.wandb.Image(str(path)) for key, path in images.items()})

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        self.run.log({key: self.wandb.Table(dataframe=table.reset_index(drop=True))})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()
