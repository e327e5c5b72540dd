"""The stage registry. Each stage module registers its `Stage`: its name, its config section,
what it needs (a function of the run, since a method without probes needs no localize) and its
result type. The runner (`app.runner`) runs the graph from here; a new stage is one module and
its `register(Stage(...))`, with its name in `config.schema.STAGES`, which gives the order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from omegaconf import DictConfig

from icm_lab.config.schema import STAGES as ORDER
from icm_lab.core.selection import LayerSelection
from icm_lab.stages.components import Components
from icm_lab.stages.resources import Resources
from icm_lab.steering.methods import SteeringMethod


class RunState(Protocol):
    """What a stage sees of the run: its config, resources and components, the method and
    layer selection, the results so far, and the denoiser calls of each stage."""

    cfg: DictConfig
    res: Resources
    parts: Components
    method: SteeringMethod
    selection: LayerSelection
    results: dict[str, Any]
    denoiser_calls: dict[str, int]
    external: Any  # another run's localization (steer.probes), loaded once


@dataclass(frozen=True)
class Stage:
    name: str
    section: str | None  # its config section, if it has one
    result: type  # what `run` returns
    needs: Callable[[RunState], tuple[str, ...]]  # the stages whose results it takes
    run: Callable[[RunState], Any]


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name not in ORDER:
        raise ValueError(f"stage {stage.name!r} is not in config.schema.STAGES {ORDER}")
    STAGES[stage.name] = stage
    return stage
