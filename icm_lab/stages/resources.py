"""What the stages of a run share: the model, its layer registry and generator, the concept, the
CLIP, the labeler, the tracker and the artefact cache. The components are built from their
config groups (`_target_` + `hydra.utils.instantiate`); everything that loads weights is built on
first use, so a stage that is skipped loads nothing.

Stages import this module; the runner builds it; it imports no stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from icm_lab.core.concepts import Concept
from icm_lab.core.layers import LayerRegistry
from icm_lab.engine.generation import Generator, Prefix
from icm_lab.io.artefacts import (
    Provenance,
    artefact_lock,
    damage,
    fingerprint,
    is_sealed,
)
from icm_lab.io.files import remove_dead_temporaries
from icm_lab.io.tracking import Tracker
from icm_lab.labeling.labelers import Labeler
from icm_lab.models.adapters import ModelAdapter, adapter_for, layer_registry
from icm_lab.models.clip import Clip
from icm_lab.models.loading import ModelSpec, resolve_device
from icm_lab.stages.components import Components, build_components

log = logging.getLogger(__name__)


class Resources:
    def __init__(self, cfg: DictConfig, run_dir: Path,
                 pipeline: DiffusionPipeline | None = None,
                 components: Components | None = None):
        """`pipeline`: one already loaded for `model=` (tests, notebooks), used as is;
        `components`: the run's, as validation built them (else built here)."""
        self._cfg = cfg
        self.components = components or build_components(cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model: ModelSpec = self.components.model
        self.artefacts = Path(cfg.paths.artefacts)
        self.verify_hashes = cfg.paths.get("verify", "sizes") == "hashes"  # validated before
        if pipeline is not None:
            self.pipeline = pipeline  # takes the cached property's place

    @cached_property
    def concept(self) -> Concept:
        return self.components.concept

    @cached_property
    def pipeline(self) -> DiffusionPipeline:
        source = self.model.pretrained or f"a random {self.model.build} twin"
        log.info("loading model %s from %s", self.model.name, source)  # seconds for real weights
        return self.model.load()

    @cached_property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.pipeline)

    @cached_property
    def registry(self) -> LayerRegistry:
        return layer_registry(self.pipeline, self.model.resolution)

    @cached_property
    def generator(self) -> Generator:
        return Generator(self.pipeline, self.registry, self.model)

    def denoiser_calls(self) -> int:
        """Denoiser calls this run has computed so far (none before the model loads)."""
        return self.generator.calls if "generator" in self.__dict__ else 0

    def prefix(self, prompts: Sequence[str], seeds: Sequence[int], step: int | None
               ) -> Prefix | None:
        """The cache of the first `step` unsteered steps of these samples, shared by every run
        that generates them on the same kind of device and dtype (None for a generation steered
        from its first step, or a scheduler whose state is more than the latents)."""
        if not step or not self.generator.caches_prefixes():
            return None
        device = self.pipeline.device
        provenance = Provenance("prefix", self.model.name, self.concept.name, fingerprint(
            model=self.model_identity(), prompts=list(prompts), seeds=[int(s) for s in seeds],
            step=step, dtype=str(self.pipeline.dtype), device=device.type,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None))
        return Prefix(self.artefact_dir(provenance), step)

    @cached_property
    def clip(self) -> Clip:
        clip = self._cfg.clip
        log.info("loading CLIP %s (%s)", clip.model, clip.pretrained or "random weights")
        return self.components.clip()

    @cached_property
    def labeler(self) -> Labeler:
        make = self.components.labeler
        extra = {"clip": self.clip} if make.func.uses_clip else {}
        return make(concept=self.concept, **extra)

    @cached_property
    def tracker(self) -> Tracker:
        name, group = self._tracking_name()
        config = OmegaConf.to_container(self._cfg, resolve=True, enum_to_str=True)
        return self.components.logger(run_dir=self.run_dir, config=config, name=name,
                                      group=group)

    def _tracking_name(self) -> tuple[str, str | None]:
        """In a multirun, one run per job named by its number, grouped by the sweep directory."""
        name = f"{self.model.name}-{self._cfg.concept.name}"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            hydra = HydraConfig.get()
            return f"{name}-{hydra.job.num}", Path(hydra.sweep.dir).name
        return f"{name}-{self.run_dir.name}", self._cfg.logger.get("group")

    # -- what artefacts depend on ----------------------------------------------------------
    def model_identity(self) -> dict[str, Any]:
        """The model settings images depend on (not the device, nor which concepts it allows),
        but for a random twin, whose weights are drawn on its device, that device's kind."""
        identity = {k: v for k, v in OmegaConf.to_container(self._cfg.model, resolve=True).items()
                    if k not in ("device", "concepts")}
        if not identity.get("pretrained"):
            identity["build_device"] = resolve_device(self._cfg.model.device).type
        return identity

    def labelling_identity(self) -> dict[str, Any]:
        """The settings labels depend on."""
        return {"clip": self._cfg.clip.model, "clip_pretrained": self._cfg.clip.pretrained,
                "labeler": OmegaConf.to_container(self._cfg.labeler, resolve=True)}

    def concept_identity(self) -> dict[str, Any]:
        return OmegaConf.to_container(self._cfg.concept, resolve=True)

    def labeler_description(self) -> dict[str, Any]:
        """The labeler and its options, with its CLIP and text groups if it reads images with
        CLIP: reported beside every fairness number."""
        options = {k: v for k, v in OmegaConf.to_container(self._cfg.labeler, resolve=True)
                   .items() if not k.startswith("_")}
        if not self.labeler.uses_clip:
            return {"name": self.labeler.name, **options}
        return {"name": self.labeler.name, **options, **self.clip_description(),
                "texts": {k: list(v) for k, v in self.concept.classifier_texts.items()}}

    def clip_description(self) -> dict[str, Any]:
        """Which CLIP: its open_clip model and weights (a tag or a path)."""
        return {"clip": self._cfg.clip.model, "pretrained": self._cfg.clip.pretrained}

    # -- the artefact cache ----------------------------------------------------------------
    def artefact_dir(self, provenance: Provenance) -> Path:
        """Content-addressed: runs with the same stage fingerprint share (and resume) it. The run
        directory links to it under the stage's name."""
        name = f"{provenance.model}-{provenance.concept}-{provenance.fingerprint}"
        path = self.artefacts / provenance.stage / name
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
            remove_dead_temporaries(path)
            yield path

    def reusable(self, root: Path) -> bool:
        """Whether the artefact at `root` (its lock held) is sealed and intact. A damaged one is
        reported file by file and moved aside, so the caller computes it afresh."""
        if not is_sealed(root):
            return False
        found = damage(root, hashes=self.verify_hashes)
        if not found:
            return True
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside = root.with_name(f"{root.name}.damaged-{stamp}")
        log.warning("the artefact at %s is damaged; moved to %s (delete it once you have looked)"
                    " and computed again:\n  %s", root, aside, "\n  ".join(found))
        root.rename(aside)
        root.mkdir()
        return False
