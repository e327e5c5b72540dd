"""Generating images from prompts and per-sample seeds, with optional hooks: the one place
every stage generates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from icm_lab.hooks import DenoiserHooks, Intervention
from icm_lab.models.layers import LayerRegistry
from icm_lab.models.loading import ModelSpec


@dataclass
class Generator:
    """A loaded pipeline with its layer registry and generation settings."""

    pipeline: DiffusionPipeline
    registry: LayerRegistry
    spec: ModelSpec

    def batch(self, prompts: Sequence[str], seeds: Sequence[int],
              interventions: Sequence[Intervention] = (), record: Sequence[str] = ()
              ) -> tuple[list[Image.Image], dict[str, np.ndarray]]:
        """One batch: the images and, if `record` names layers, their recorded activations.
        Interventions hold one row per sample of this batch."""
        # CPU generators make the initial noise identical on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with DenoiserHooks(self.pipeline, self.registry, record=record,
                           interventions=interventions) as hooks:
            images = self.pipeline(prompt=list(prompts), generator=generators,
                                   output_type="pil", **self.spec.pipeline_kwargs()).images
        return images, (hooks.recording() if record else {})

    def all(self, prompts: Sequence[str], seeds: Sequence[int],
            interventions: Sequence[Intervention] = (), desc: str = "generate"
            ) -> list[Image.Image]:
        """All samples, in batches of `model.batch_size`, with a progress bar."""
        size = self.spec.batch_size
        images: list[Image.Image] = []
        starts = range(0, len(prompts), size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2):
            stop = start + size
            rows = [intervention.rows(start, stop) for intervention in interventions]
            images += self.batch(prompts[start:stop], seeds[start:stop], rows)[0]
        return images
