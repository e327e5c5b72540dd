"""Load a pipeline from its model config: real weights through `from_pretrained`, or a tiny
random-weight twin built offline."""

from __future__ import annotations

import logging
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from icm_lab.models.tiny import build_random

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        log.warning("float16 is slow or unsupported on the CPU; using float32 instead")
        return torch.float32
    return DTYPES[name]


def load_pipeline(model: DictConfig) -> DiffusionPipeline:
    """The pipeline named by `model`, on its device and dtype, with its configured scheduler."""
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    pipe_cls = getattr(diffusers, model.pipeline)
    if model.pretrained:
        pipe = _from_pretrained(pipe_cls, model, dtype)
    elif model.build:
        pipe = build_random(model.build, seed=model.build_seed)
    else:
        raise ModelLoadError(f"model {model.name!r} sets neither model.pretrained nor model.build")
    if not isinstance(pipe, pipe_cls):
        raise ModelLoadError(f"model {model.name!r} loaded a {type(pipe).__name__}, "
                             f"expected {model.pipeline}")
    if model.scheduler:
        scheduler_cls = getattr(diffusers, model.scheduler)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if model.build and not model.pretrained and dtype != torch.float32:
        pipe.to(dtype=dtype)  # twins are built in float32; real weights load in their dtype
    pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(pipe_cls: type, model: DictConfig, dtype: torch.dtype) -> DiffusionPipeline:
    kwargs: dict[str, Any] = OmegaConf.to_container(model.load_kwargs, resolve=True) or {}
    if model.get("variant"):
        kwargs["variant"] = model.variant
    # Loading takes seconds; its per-component progress bars would only bury the run's own.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        return pipe_cls.from_pretrained(model.pretrained, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load model {model.name!r} from {model.pretrained!r}: {error}\n"
            "Weights are read from a local path or the Hugging Face cache. On a machine without "
            f"network, download them elsewhere and pass model.pretrained=/path/to/{model.name}."
        ) from error


def pipeline_call_kwargs(model: DictConfig) -> dict[str, Any]:
    """The keyword arguments every generation with this model passes to the pipeline."""
    extra = OmegaConf.to_container(model.call_kwargs, resolve=True) or {}
    return dict(
        num_inference_steps=model.steps,
        guidance_scale=model.guidance,
        height=model.resolution,
        width=model.resolution,
        **extra,
    )
