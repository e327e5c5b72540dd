"""The runner: chains the configured stages inside one run directory.

Stages are functions `stage(ctx) -> artefact`. The context loads what they share (pipeline,
layer registry, concept, CLIP) once, on first use, so a stage that is skipped loads nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from icm_lab.artefacts import Provenance, artefact_lock
from icm_lab.concepts import Concept
from icm_lab.labeler import Labeler, make_labeler
from icm_lab.models.clip import Clip, load_clip
from icm_lab.models.layers import LayerRegistry, layer_registry
from icm_lab.models.loading import load_pipeline
from icm_lab.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)


class RunContext:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}

    def stage(self, name: str) -> Any:
        """A stage's artefact: from this run if it ran, else run it (it reuses its artefact on
        disk when one matches). Stages call this for their inputs."""
        from icm_lab.stages import STAGES

        if name not in self.results:
            log.info("stage %s", name)
            self.results[name] = STAGES[name](self)
        return self.results[name]

    @cached_property
    def tracker(self) -> Tracker:
        return make_tracker(self.cfg, self.run_dir)

    @cached_property
    def concept(self) -> Concept:
        return Concept.from_config(self.cfg.concept)

    @cached_property
    def pipeline(self) -> DiffusionPipeline:
        return load_pipeline(self.cfg.model)

    @cached_property
    def registry(self) -> LayerRegistry:
        return layer_registry(self.pipeline, self.cfg.model.resolution)

    @cached_property
    def clip(self) -> Clip:
        return load_clip(self.cfg.clip)

    @cached_property
    def labeler(self) -> Labeler:
        return make_labeler(self.cfg.labeler, self.concept, lambda: self.clip)

    def artefact_dir(self, provenance: Provenance) -> Path:
        """Content-addressed: runs with the same stage fingerprint share (and resume) it. The run
        directory links to it under the stage's name."""
        name = f"{provenance.model}-{provenance.concept}-{provenance.fingerprint}"
        path = Path(self.cfg.paths.artefacts) / provenance.stage / name
        path.mkdir(parents=True, exist_ok=True)
        link = self.run_dir / provenance.stage
        if not link.exists():
            link.symlink_to(path.resolve(), target_is_directory=True)
        return path

    @contextmanager
    def artefact(self, provenance: Provenance) -> Iterator[Path]:
        """`artefact_dir`, held under an exclusive lock for the block: concurrent jobs that need
        the same artefact wait while the first computes it, then find it complete and reuse it."""
        path = self.artefact_dir(provenance)
        with artefact_lock(path):
            yield path


def validate_stages(stages: list[str]) -> list[str]:
    from icm_lab.stages import STAGES  # stages import the runner

    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; available stages: {list(STAGES)}")
    if not stages:
        raise ValueError(f"stages is empty; available stages: {list(STAGES)}")
    return list(stages)


def objective(cfg: DictConfig, metrics: dict | None) -> float | None:
    """The value a sweeper minimises: the steered `objective.metric`; below the CLIP-I floor,
    1 + metric + shortfall, which ranks behind every feasible trial since FD < 1."""
    if metrics is None:
        return None
    value = float(metrics["steered"][cfg.objective.metric])
    floor = cfg.objective.clip_i_floor
    clip_i = metrics["steered"].get("clip_i")
    if floor is not None and clip_i is not None and clip_i < floor:
        return 1 + value + (floor - clip_i)
    return value


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the configured stages in order and return their artefacts by stage name."""
    stages = validate_stages(list(cfg.stages))
    ctx = RunContext(cfg, run_dir)
    (ctx.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = ctx.tracker  # started first, so a job that fails early still has its run
    exit_code = 1
    try:
        for stage in stages:
            ctx.stage(stage)
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
    return {stage: ctx.results[stage] for stage in stages}
