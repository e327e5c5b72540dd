"""The runner: owns the stage graph and wires each stage to its inputs.

    collect --> localize --> steer --> evaluate
                   └─> causal ─┘   (causal: asked for, or needed by layers.rank_by=causal)

Each stage module registers its `Stage` (`stages.registry`): its name, section, what it needs
and its result type; this module runs the graph from the registry. A stage is a function of
the shared resources (`Resources`), its own config section (a checked dataclass from
`config/schema.py`) and the results of the stages it needs. A stage that is asked for runs
its inputs first; each reuses its artefact on disk when one with the same fingerprint exists.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icm_lab.app.validation import validate
from icm_lab.config.schema import STAGES
from icm_lab.core.selection import LayerSelection, step_window
from icm_lab.io.files import write_text
from icm_lab.stages import causal, collect, evaluate, localize, steer  # noqa: F401 (register)
from icm_lab.stages.components import Components
from icm_lab.stages.registry import STAGES as STAGE_REGISTRY
from icm_lab.stages.resources import Resources
from icm_lab.steering.methods import SteeringMethod

log = logging.getLogger(__name__)


class Run:
    """One run's stage graph over one set of resources (a `stages.registry.RunState`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, components: Components | None = None):
        self.cfg = cfg
        self.res = Resources(cfg, run_dir, components=components)
        self.parts = self.res.components
        self.method: SteeringMethod = self.parts.method
        layers, steer_cfg = self.parts.sections["layers"], self.parts.sections["steer"]
        self.selection = LayerSelection(
            layers.select, layers.kind, layers.k,
            step_window(steer_cfg.start, steer_cfg.end, self.res.model.steps), layers.rank_by)
        self.external = None  # steer.probes: another run's localization, loaded once
        self.results: dict[str, Any] = {}
        self.denoiser_calls: dict[str, int] = {}  # per stage, this run's computing calls

    def needs(self, stage: str) -> tuple[str, ...]:
        """The stages whose results `stage` takes."""
        return STAGE_REGISTRY[stage].needs(self)

    def result(self, stage: str) -> Any:
        """The stage's result, running it (after its inputs) unless this run already has it."""
        if stage not in self.results:
            for upstream in self.needs(stage):
                self.result(upstream)
            log.info("stage %s", stage)
            before = self.res.denoiser_calls()
            self.results[stage] = STAGE_REGISTRY[stage].run(self)
            self.denoiser_calls[stage] = self.res.denoiser_calls() - before
            log.info("stage %s: %d denoiser calls", stage, self.denoiser_calls[stage])
        return self.results[stage]


# A trial under the CLIP-I floor scores this plus its shortfall: behind every feasible trial,
# whatever the metric's range (FD reaches ~1.4, KL and FID are unbounded), and the infeasible
# ones ranked by how far they fall short.
INFEASIBLE = 1e9


def objective(cfg: DictConfig, metrics: dict | None) -> float | None:
    """The value a sweeper minimises: the steered `objective.metric`, or INFEASIBLE plus the
    shortfall for a trial under `objective.clip_i_floor`."""
    if metrics is None:
        return None
    value = float(metrics["steered"][cfg.objective.metric])
    floor = cfg.objective.clip_i_floor
    clip_i = metrics["steered"].get("clip_i")
    if floor is not None and clip_i is not None and clip_i < floor:
        return INFEASIBLE + (floor - clip_i)
    return value


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Check the config, then run the configured stages in order; their results by name."""
    components = validate(cfg)  # checked once per process, built once per run
    stages = [s for s in STAGES if s in cfg.stages]
    pipeline = Run(cfg, run_dir, components)
    write_text(pipeline.res.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    tracker = pipeline.res.tracker  # started first, so a job that fails early still has its run
    exit_code = 1
    try:
        # The model first, and the CLIP that evaluate will need: missing weights are reported
        # before any artefact folder is made (every stage set but a reused collection needs
        # the model anyway).
        pipeline.res.pipeline  # noqa: B018
        if "evaluate" in stages:
            pipeline.res.clip  # noqa: B018
        for stage in stages:
            pipeline.result(stage)
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
    return {stage: pipeline.results[stage] for stage in stages}
