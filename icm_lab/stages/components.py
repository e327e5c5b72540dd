"""What the config groups build, once per run: `build_components(cfg)` instantiates every
component (`_target_` + `hydra.utils.instantiate`), and both the pre-check (`app.validation`,
before Hydra starts a sweep) and the run (`Resources`, `Run`) use what it returns.

Components that load weights are built as partials (`clip`, `labeler`, `logger` take what the
run supplies: the CLIP, the concept, the run directory); nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from icm_lab.config.schema import SECTIONS, section
from icm_lab.core.concepts import Concept
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.models.loading import ModelSpec
from icm_lab.probing.probes import Probe
from icm_lab.steering.methods import SteeringMethod


def build(node: DictConfig, key: str) -> Any:
    """`instantiate(node)`, with a refusal by the target's own checks passed on as is."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise ConfigError(f"{key}: {str(error).splitlines()[-1]}") from error


@dataclass(frozen=True)
class Components:
    """Every component of one config, and its plain sections as checked dataclasses."""

    model: ModelSpec
    method: SteeringMethod
    probe: Probe
    concept: Concept
    labeler: partial  # (concept=, clip=) -> Labeler
    clip: partial  # () -> Clip, loading its weights
    logger: partial  # (run_dir=, config=, name=, group=) -> Tracker
    sections: dict[str, Any]


def build_components(cfg: DictConfig) -> Components:
    """Build each component once; a bad value is refused in one line (its key, the value and
    the valid choices)."""
    sections = {name: section(cfg, name) for name in SECTIONS}
    return Components(
        model=build(cfg.model, "model"), method=build(cfg.method, "method"),
        probe=build(cfg.probe, "probe"), concept=Concept.from_config(cfg.concept),
        labeler=build(cfg.labeler, "labeler"), clip=build(cfg.clip, "clip"),
        logger=build(cfg.logger, "logger"), sections=sections)
