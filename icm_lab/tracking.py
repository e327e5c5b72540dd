"""Experiment tracking. Results are always written to disk first; a tracker mirrors them.

`logger=none` tracks nothing. `logger=wandb` logs to Weights & Biases, one run per job, grouped
by sweep in a multirun. With no API key (or WANDB_MODE=offline) the run is written offline, and
the run says so once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    """The no-op tracker (`logger=none`)."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, group: str | None, name: str):
        import wandb

        self.wandb = wandb
        mode = cfg.logger.mode or os.environ.get("WANDB_MODE")
        if mode is None and not _has_wandb_key():
            mode = "offline"
            log.warning("W&B: no API key found, logging offline to %s/wandb "
                        "(sync later with `wandb sync`)", run_dir)
        self.run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, group=group, name=name,
            dir=str(run_dir), mode=mode, reinit="finish_previous",
            config=OmegaConf.to_container(cfg, resolve=True),
        )

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


def make_tracker(cfg: DictConfig, run_dir: Path) -> Tracker:
    if cfg.logger.name == "none":
        return Tracker()
    if cfg.logger.name != "wandb":
        raise ValueError(f"unknown logger {cfg.logger.name!r}; valid: ['none', 'wandb']")
    group, name = _sweep_group_and_name(cfg, run_dir)
    return WandbTracker(cfg, run_dir, group, name)


def _sweep_group_and_name(cfg: DictConfig, run_dir: Path) -> tuple[str | None, str]:
    """In a multirun, group by the sweep directory and name the run by its job number."""
    name = f"{cfg.model.name}-{cfg.concept.name}"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN:
            return Path(hydra.sweep.dir).name, f"{name}-{hydra.job.num}"
    except ValueError:  # not running under @hydra.main (tests, notebooks)
        pass
    return cfg.logger.get("group"), f"{name}-{run_dir.name}"
