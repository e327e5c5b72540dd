"""Composing the Hydra config outside `@hydra.main` (CLI subcommands, benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config that `python -m icm_lab OVERRIDES` would run with."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))
