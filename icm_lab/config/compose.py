"""Composing the Hydra config outside `@hydra.main` (CLI subcommands, benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from icm_lab.config import schema

PACKAGE = Path(__file__).resolve().parent.parent


def shipped(name: str) -> Path:
    """`conf/` or `sweeps/`: inside the package when installed from a wheel (which ships them
    there), else the repository's top-level folder (a checkout or an editable install)."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


CONFIG_DIR = shipped("conf")
SWEEPS_DIR = shipped("sweeps")


def register_sweeps() -> list[str]:
    """`sweeps/NAME.yaml` as the `sweep` config group, merged at the top level, so that
    `python -m icm_lab -m +sweep=NAME` runs it. (Hydra finds groups only under a search-path
    root; the config store puts sweeps/ there without moving it into conf/.)"""
    store = ConfigStore.instance()
    names = sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))
    for name in names:
        store.store(group="sweep", name=name, node=OmegaConf.load(SWEEPS_DIR / f"{name}.yaml"),
                    package="_global_")
    return names


register_sweeps()
schema.register()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config that `python -m icm_lab OVERRIDES` would run with, from this directory."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    if not any(o.lstrip("+").startswith("paths.root=") for o in overrides):
        cfg.paths.root = str(Path.cwd())  # what ${hydra:runtime.cwd} gives a run
    return cfg
