"""Generating images from prompts and per-sample seeds, with optional hooks: the one place
every stage generates.

A steered generation and the unsteered one of the same prompts and seeds agree up to the step
where steering starts. `Prefix` caches the latents at that step, per batch, so every steering
configuration of a sweep (each method, alpha, layer set with that start) and the base images
compute the shared prefix once: a generation that passes through it unsteered writes it, one
that finds it skips those denoiser calls and continues from the cached latents, bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from icm_lab.core.layers import LayerRegistry
from icm_lab.engine.hooks import DenoiserHooks, Intervention
from icm_lab.io.files import atomic
from icm_lab.models.loading import ModelSpec

log = logging.getLogger(__name__)

# Schedulers whose step reads only (model output, timestep, latents, noise generator) and keeps
# no past model outputs: the latents after step s then hold the whole state of a generation, and
# skipped prefix steps still draw the same noise. Multistep, PNDM and Heun schedulers keep
# history, so a prefix of theirs cannot be resumed from latents alone.
STATELESS_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                        "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def prefix_refusal(pipeline: DiffusionPipeline) -> str | None:
    """Why the pipeline's generations cannot continue from cached latents, or None if they can."""
    name = type(pipeline.scheduler).__name__
    if name in STATELESS_SCHEDULERS:
        return None
    return (f"{name} keeps state between steps (only {', '.join(STATELESS_SCHEDULERS)} do not), "
            "so a cached prefix could not be resumed exactly; generating from scratch")


@dataclass(frozen=True)
class Prefix:
    """The latents after the first `step` steps of each batch of one plan (prompts and seeds),
    cached in `root`, a content-addressed artefact (`Resources.prefix`)."""

    root: Path
    step: int

    def path(self, start: int, stop: int) -> Path:
        return self.root / f"{start:07d}-{stop:07d}.safetensors"

    def load(self, start: int, stop: int) -> torch.Tensor | None:
        """The cached latents, or None when absent. A damaged file (unreadable, or latents
        other than the hash it was saved with) is deleted with a warning: computed again."""
        path = self.path(start, stop)
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                latents, saved = f.get_tensor("latents"), f.metadata()["sha256"]
            if _digest(latents) == saved:
                return latents
            problem = "its latents differ from the hash they were saved with"
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            problem = f"unreadable ({error})"
        log.warning("cached prefix %s is damaged (%s); deleted, computing it again", path, problem)
        path.unlink(missing_ok=True)
        return None

    def save(self, start: int, stop: int, latents: torch.Tensor) -> None:
        """Atomically: concurrent jobs (which compute the same bytes) never see half a file."""
        latents = latents.detach().cpu().contiguous()
        with atomic(self.path(start, stop)) as tmp:
            save_file({"latents": latents}, tmp, metadata={"sha256": _digest(latents)})


@dataclass(frozen=True)
class PrefixRows:
    """A plan whose samples repeat samples of another plan (`source`, generated in batches of
    `size`): sample j starts from the cached latents of the source's sample `rows[j]`. Many
    steered runs of the same images (the causal map's layers and classes, batched together) so
    share the one prefix of their unsteered images. Only the source's own generation writes it."""

    source: Prefix
    rows: tuple[int, ...]
    size: int  # the source plan's batch size
    n: int  # samples in the source plan

    @property
    def step(self) -> int:
        return self.source.step

    def load(self, start: int, stop: int) -> torch.Tensor | None:
        """The latents of samples `start:stop`, gathered from the source's batches; None when
        one of those batches is not cached."""
        wanted = self.rows[start:stop]
        batches = {}
        for first in sorted({row // self.size * self.size for row in wanted}):
            batches[first] = self.source.load(first, min(first + self.size, self.n))
            if batches[first] is None:
                return None
        return torch.stack([batches[row // self.size * self.size][row % self.size]
                            for row in wanted])

    def save(self, start: int, stop: int, latents: torch.Tensor) -> None:
        """Nothing: these samples' prefix is the source's, written by its own generation."""


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


class _PrefixCallback:
    """`callback_on_step_end` at the end of the prefix (loop index step - 1): keeps the latents
    there, or replaces them with cached ones."""

    def __init__(self, step: int, cached: torch.Tensor | None):
        self.step, self.cached, self.latents = step, cached, None

    def __call__(self, pipe: DiffusionPipeline, i: int, t: Any, kwargs: dict) -> dict:
        if i != self.step - 1:
            return {}
        latents = kwargs["latents"]
        if self.cached is None:
            self.latents = latents.clone()
            return {}
        if self.cached.shape != latents.shape or self.cached.dtype != latents.dtype:
            raise ValueError(f"cached prefix latents are {self.cached.dtype} "
                             f"{tuple(self.cached.shape)}, the generation's {latents.dtype} "
                             f"{tuple(latents.shape)}: not the same generation")
        return {"latents": self.cached.to(latents.device)}  # a copy, exact


@dataclass
class Generator:
    """A loaded pipeline with its layer registry and generation settings. `calls` counts the
    denoiser calls that computed, for the run's report."""

    pipeline: DiffusionPipeline
    registry: LayerRegistry
    spec: ModelSpec
    calls: int = field(default=0, init=False)
    _refusal_logged: bool = field(default=False, init=False, repr=False)

    def usable(self, prefix: Prefix | PrefixRows | None,
               interventions: Sequence[Intervention] = ()) -> Prefix | PrefixRows | None:
        """`prefix`, or None (with a warning, once) when this pipeline's scheduler keeps
        state between steps. Steering inside the prefix is refused: it would not be shared."""
        if prefix is None:
            return None
        early = [i.layer for i in interventions if i.start < prefix.step]
        if early:
            raise ValueError(f"interventions on {early} start before the cached prefix "
                             f"ends (step {prefix.step})")
        return prefix if self.caches_prefixes() else None

    def caches_prefixes(self) -> bool:
        """Whether generations can continue from cached latents (a warning, once, if not)."""
        refusal = prefix_refusal(self.pipeline)
        if refusal and not self._refusal_logged:
            log.warning("prefix cache off: %s", refusal)
            self._refusal_logged = True
        return refusal is None

    def batch(self, prompts: Sequence[str], seeds: Sequence[int],
              interventions: Sequence[Intervention] = (), record: Sequence[str] = (),
              prefix: Prefix | PrefixRows | None = None, first: int = 0,
              ) -> tuple[list[Image.Image], dict[str, np.ndarray]]:
        """One batch: the images and, if `record` names layers, their recorded activations.
        Interventions hold one row per sample of this batch. With `prefix`, the batch (samples
        `first`, `first + 1`, ... of the prefix's plan) continues from its cached latents, or
        writes them while passing through the prefix."""
        # CPU generators make the initial noise identical on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs = self.spec.pipeline_kwargs()
        prefix = self.usable(prefix, interventions)
        stop = first + len(prompts)
        cached = prefix.load(first, stop) if prefix is not None else None
        callback = _PrefixCallback(prefix.step, cached) if prefix is not None else None
        if callback is not None:
            kwargs |= dict(callback_on_step_end=callback,
                           callback_on_step_end_tensor_inputs=["latents"])
        skip = prefix.step if cached is not None else 0
        with DenoiserHooks(self.pipeline, self.registry, record=record,
                           interventions=interventions, skip_before=skip) as hooks:
            images = self.pipeline(prompt=list(prompts), generator=generators,
                                   output_type="pil", **kwargs).images
        self.calls += hooks.calls
        if callback is not None and cached is None:
            if callback.latents is None:
                raise RuntimeError(f"the generation never reached step {prefix.step}, where "
                                   "its prefix ends")
            prefix.save(first, stop, callback.latents)
        return images, (hooks.recording() if record else {})

    def all(self, prompts: Sequence[str], seeds: Sequence[int],
            interventions: Sequence[Intervention] = (), desc: str = "generate",
            prefix: Prefix | None = None) -> list[Image.Image]:
        """All samples, in batches of `model.batch_size`, with a progress bar. With `prefix`,
        each batch continues from its cached prefix, or writes it while passing through."""
        prefix = self.usable(prefix, interventions)
        size = self.spec.batch_size
        images: list[Image.Image] = []
        starts = range(0, len(prompts), size)
        if prefix is not None:
            cached = sum(prefix.path(s, min(s + size, len(prompts))).exists() for s in starts)
            log.info("%s: %d of %d batches continue from the cached prefix (steps 0-%d) in %s",
                     desc, cached, len(starts), prefix.step - 1, prefix.root)
        for start in tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2):
            stop = start + size
            rows = [intervention.rows(start, stop) for intervention in interventions]
            images += self.batch(prompts[start:stop], seeds[start:stop], rows,
                                 prefix=prefix, first=start)[0]
        return images
