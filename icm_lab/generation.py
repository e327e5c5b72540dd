"""Generating images from prompts and per-sample seeds, with optional hooks: the one place
every stage generates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from icm_lab.hooks import DenoiserHooks, Intervention
from icm_lab.models.loading import pipeline_call_kwargs
from icm_lab.runner import RunContext


def generate(ctx: RunContext, prompts: Sequence[str], seeds: Sequence[int],
             interventions: Sequence[Intervention] = (),
             record: Sequence[str] = ()) -> tuple[list[Image.Image], dict[str, np.ndarray]]:
    """One batch: the images and, if `record` names layers, their recorded activations.
    Interventions hold one row per sample of this batch."""
    # CPU generators make the initial noise identical on every device.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with DenoiserHooks(ctx.pipeline, ctx.registry, record=record,
                       interventions=interventions) as hooks:
        images = ctx.pipeline(prompt=list(prompts), generator=generators, output_type="pil",
                              **pipeline_call_kwargs(ctx.cfg.model)).images
    return images, (hooks.recording() if record else {})


def generate_all(ctx: RunContext, prompts: Sequence[str], seeds: Sequence[int],
                 interventions: Sequence[Intervention] = (), desc: str = "generate"
                 ) -> list[Image.Image]:
    """All samples, in batches of `model.batch_size`, with a progress bar."""
    size = int(ctx.cfg.model.batch_size)
    images: list[Image.Image] = []
    starts = range(0, len(prompts), size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2):
        stop = start + size
        batch = [intervention.rows(start, stop) for intervention in interventions]
        images += generate(ctx, prompts[start:stop], seeds[start:stop], batch)[0]
    return images
