"""Model configs as objects (`conf/model/*.yaml` -> `ModelSpec` through `_target_`): loading
real weights through `from_pretrained` or building a tiny random-weight twin offline, the
arguments every generation passes, and the layer registry read without loading weights."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from icm_lab.core.errors import ConfigError, ModelUnavailable, choices_error
from icm_lab.core.layers import LayerRegistry
from icm_lab.models.adapters import (
    ADAPTERS,
    ModelAdapter,
    adapter_for,
    adapter_for_class,
    layer_registry,
)
from icm_lab.models.tiny import BUILDERS, build_random

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ModelUnavailable, RuntimeError):
    pass


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: weights come from a local folder or the Hugging Face cache only."""
    return bool(huggingface_hub.constants.is_offline_mode())


def looks_like_path(pretrained: str) -> bool:
    """`/abs`, `./rel`, `~/x`: a folder, never a Hub id (`org/name`)."""
    return pretrained.startswith(("/", ".", "~"))


def local_folder(pretrained: str) -> Path | None:
    """`pretrained` on this machine: the folder itself, or a Hub id's snapshot in the Hugging
    Face cache; None when it is neither."""
    if Path(pretrained).expanduser().is_dir():
        return Path(pretrained).expanduser()
    if looks_like_path(pretrained):
        return None
    try:
        return Path(huggingface_hub.snapshot_download(pretrained, local_files_only=True))
    except (OSError, ValueError):  # not cached; not a valid repo id
        return None


class _DropHubFallback(logging.Filter):
    """diffusers' "Couldn't connect to the Hub ... Will try to load from local cache": when the
    cache then lacks the weights, ModelSpec.load says so in its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Couldn't connect to the Hub")


logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_DropHubFallback())


def resolve_device(device: str) -> torch.device:
    """`auto`: this job's own GPU (`job_gpu`) when there is one, else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", job_gpu(torch.cuda.device_count()))
    return torch.device(device)


# Launchers that start several tasks of one job on a node number them in these variables.
LOCAL_TASK_VARIABLES = ("SLURM_LOCALID", "SUBMITIT_LOCAL_LOCALID")


def job_gpu(visible: int) -> int:
    """The GPU index a job takes among the `visible` ones: (Hydra's job number + the launcher's
    local task id) modulo `visible`. joblib runs every job of a sweep on one node with every GPU
    visible, so without this they would all take cuda:0; SLURM and submitit's local executor
    show each job only its own GPUs (CUDA_VISIBLE_DEVICES), where this gives 0 with one."""
    local_task = next((int(os.environ[v]) for v in LOCAL_TASK_VARIABLES
                       if os.environ.get(v, "").isdigit()), 0)
    return (hydra_job_number() + local_task) % max(visible, 1)


def hydra_job_number() -> int:
    """`hydra.job.num` inside a multirun job; 0 in a single run or outside Hydra."""
    if not HydraConfig.initialized():
        return 0
    number = OmegaConf.select(HydraConfig.get(), "job.num", default=0)
    return number if isinstance(number, int) else 0


def like_parameters(tensor: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
    """`tensor` on the device of `net`'s weights and, if floating point, in their dtype: every
    input of a model passes through here (token ids and 8-bit images keep their dtype)."""
    param = next(net.parameters())
    return tensor.to(param.device, param.dtype if tensor.is_floating_point() else tensor.dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise choices_error("model.dtype", name, sorted(DTYPES))
    if device.type == "cpu" and name == "float16":
        log.warning("float16 is slow or unsupported on the CPU; using float32 instead")
        return torch.float32
    return DTYPES[name]


@dataclass
class ModelSpec:
    """What `model=` names: the pipeline, its weights or twin builder, and how it generates."""

    name: str
    pipeline: str  # a diffusers pipeline class
    pretrained: str | None = None  # a Hub id or a local save_pretrained() folder
    variant: str | None = None
    build: str | None = None  # a random-weight twin (models/tiny.py) when pretrained is null
    build_seed: int = 0
    dtype: str = "float32"
    component_dtypes: dict[str, str] = field(default_factory=dict)  # e.g. Sana's {vae: float32}
    device: str = "auto"
    scheduler: str | None = None  # a diffusers scheduler class; null keeps the checkpoint's
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    batch_size: int = 8
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    concepts: list[str] | None = None  # the concepts the model can draw; None: any

    def __post_init__(self) -> None:
        self.load_kwargs, self.call_kwargs = dict(self.load_kwargs), dict(self.call_kwargs)
        self.component_dtypes = dict(self.component_dtypes)
        components = [name for name in inspect.signature(getattr(diffusers, self.pipeline)
                                                         ).parameters if name != "self"]
        for component, name in self.component_dtypes.items():
            if component not in components:
                raise choices_error("model.component_dtypes", component, components,
                                    f" for {self.pipeline}")
            if name not in DTYPES:
                raise choices_error(f"model.component_dtypes.{component}", name, sorted(DTYPES))
        if not hasattr(diffusers, self.pipeline):
            raise ConfigError(f"model.pipeline={self.pipeline!r} is not a diffusers pipeline")
        if self.scheduler and not hasattr(diffusers, self.scheduler):
            raise ConfigError(f"model.scheduler={self.scheduler!r} is not a diffusers scheduler")
        if self.dtype not in DTYPES:
            raise choices_error("model.dtype", self.dtype, sorted(DTYPES))
        if not self.pretrained and not self.build:
            raise ConfigError(f"model {self.name!r} sets neither model.pretrained nor "
                              "model.build")
        if self.build and self.build not in BUILDERS:
            raise choices_error("model.build", self.build, sorted(BUILDERS))
        for key in ("steps", "resolution", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
        self.concepts = None if self.concepts is None else list(self.concepts)

    def check_concept(self, concept: str) -> None:
        """Refuse a concept the model cannot draw (the toy world has shapes, not people)."""
        if self.concepts is not None and concept not in self.concepts:
            raise choices_error("concept", concept, self.concepts, f" for model={self.name}")

    def check_available(self) -> None:
        """Refuse, before anything is loaded or written, weights that are not on this machine
        when they cannot be downloaded either (HF_HUB_OFFLINE), or a folder that is not there."""
        if not self.pretrained or local_folder(self.pretrained):
            return
        if looks_like_path(self.pretrained):
            raise ModelLoadError(f"model.pretrained={self.pretrained!r} is not a folder; pass "
                                 "the folder that save_pretrained() wrote")
        if hub_offline():
            raise self._not_here("are not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                                 "forbids downloading them")

    def _not_here(self, why: str) -> ModelLoadError:
        """Missing weights: what is wrong, and the commands that fix it."""
        return ModelLoadError(
            f"model={self.name} needs the weights {self.pretrained!r}, which {why}. Run `hf "
            f"download {self.pretrained}` where there is network, or pass model.pretrained="
            f"/path/to/{self.name}; model=toy needs no download")

    def load(self) -> DiffusionPipeline:
        """The pipeline, on its device and dtype, with its configured scheduler."""
        self.check_available()
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        pipe_cls = getattr(diffusers, self.pipeline)
        if self.pretrained:
            pipe = self._from_pretrained(pipe_cls, dtype)
        else:  # built where it runs: a full-size twin initialises in seconds on a GPU
            with torch.device(device):
                pipe = build_random(self.build, seed=self.build_seed)
            # the scheduler's tables stay on the CPU, where from_pretrained leaves them
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        if not isinstance(pipe, pipe_cls):
            raise ModelLoadError(f"model {self.name!r} loaded a {type(pipe).__name__}, "
                                 f"expected {self.pipeline}")
        if self.scheduler:
            pipe.scheduler = getattr(diffusers, self.scheduler).from_config(pipe.scheduler.config)
        if not self.pretrained and dtype != torch.float32:
            pipe.to(dtype=dtype)  # twins are built in float32; real weights load in their dtype
        pipe.to(device=device)
        if not self.pretrained:  # a twin is built in float32; real weights loaded in their dtypes
            for component, name in self.component_dtypes.items():
                getattr(pipe, component).to(dtype=resolve_dtype(name, device))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _from_pretrained(self, pipe_cls: type, dtype: torch.dtype) -> DiffusionPipeline:
        kwargs = dict(self.load_kwargs)
        if self.variant:
            kwargs["variant"] = self.variant
        # Loading takes seconds; its per-component progress bars would only bury the run's own.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        try:  # offline: the cache only, so diffusers neither tries the Hub nor advises it
            return pipe_cls.from_pretrained(self.pretrained, dtype=self._dtypes(dtype),
                                            local_files_only=hub_offline(), **kwargs)
        except (OSError, ValueError) as error:
            if not local_folder(self.pretrained):  # the Hub could not be reached
                raise self._not_here("are not in the Hugging Face cache and could not be "
                                     "downloaded from the Hub") from error
            raise ModelLoadError(f"could not load model={self.name} from {self.pretrained!r}: "
                                 f"{str(error).splitlines()[0][:300]}") from error

    def _dtypes(self, dtype: torch.dtype) -> torch.dtype | dict[str, torch.dtype]:
        """`dtype`, or per component (diffusers' dict form) where `component_dtypes` says so:
        each component loads straight into its own dtype."""
        if not self.component_dtypes:
            return dtype
        device = resolve_device(self.device)
        return {"default": dtype} | {name: resolve_dtype(value, device)
                                     for name, value in self.component_dtypes.items()}

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every generation with this model passes to the pipeline."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance,
                    height=self.resolution, width=self.resolution, **self.call_kwargs)

    def registry_without_weights(self) -> tuple[LayerRegistry, ModelAdapter] | None:
        """The layer registry from the denoiser's config alone, built on the meta device, so a
        run can check layer names in seconds. None if the config is not on this machine (the
        load then says what is missing)."""
        if not self.pretrained:
            with torch.device("meta"):
                pipe = build_random(self.build, self.build_seed)
            return layer_registry(pipe, self.resolution), adapter_for(pipe)
        # Configs read from the folder itself: diffusers' Hub path would warn about its own
        # arguments (local_dir_use_symlinks) and has nothing to fetch.
        folder = local_folder(self.pretrained)
        try:
            index = DiffusionPipeline.load_config(folder) if folder else None
        except (OSError, ValueError):
            index = None
        if index is None:
            return None
        for attr in dict.fromkeys(adapter.denoiser_attr for adapter in ADAPTERS.values()):
            if attr in index:  # the adapter of the denoiser's class, not of its attribute name
                adapter = adapter_for_class(index[attr][1])
                net_cls = getattr(diffusers, index[attr][1])
                vae_cls = getattr(diffusers, index["vae"][1])
                config = net_cls.load_config(folder, subfolder=attr)
                vae = vae_cls.load_config(folder, subfolder="vae")
                with init_empty_weights():
                    net = net_cls.from_config(config)
                latent = self.resolution // adapter.vae_scale_factor(vae)
                return LayerRegistry(adapter.walk(net, latent)), adapter
        return None
