"""Structured config schemas: the types, ranges and allowed values of the plain config sections,
registered in Hydra's ConfigStore as the base of `conf/config.yaml`.

Types are checked when the config is composed (`collect.n_images=abc` is refused by Hydra);
ranges and allowed values when a section becomes its dataclass (`section(cfg, "steer")`), which
the validation pass does before anything is loaded or written. Sections that are components
(`model`, `method`, `probe`, `labeler`, `clip`, `logger`) are checked by their own classes when
instantiated, and `concept` by `Concept.from_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from icm_lab.core.errors import ConfigError, choices_error

STAGES = ("collect", "localize", "causal", "steer", "evaluate")  # in data-flow order
DEFAULT_STAGES = ("collect", "localize", "steer", "evaluate")  # causal: asked for, or rank_by
RANK_BY = ("separability", "causal")  # layers=auto ranks by probe score or by causal effect
LAYER_KINDS = ("attn1", "attn2", "bottleneck")
STEER_UNITS = ("raw", "sigma")  # steer.units: what alpha counts (steering.calibrated_scale)


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise choices_error(key, value, valid)


def _count(key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def _fraction(key: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{key}={value!r} must be a number in [{low}, {high}]")


@dataclass
class CollectConfig:
    n_images: int = 512  # total images, spread round-robin over the concept's neutral prompts
    batch_size: int = 8
    record: list[str] = field(default_factory=lambda: list(LAYER_KINDS))
    shard: int = 0  # with num_shards=n, this job writes batches shard, shard+n, ...
    num_shards: int = 1

    def __post_init__(self) -> None:
        _count("collect.n_images", self.n_images)
        _count("collect.batch_size", self.batch_size)
        _count("collect.num_shards", self.num_shards)
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"collect.shard={self.shard} must be in [0, collect.num_shards="
                              f"{self.num_shards})")
        if not self.record:
            raise ConfigError(f"collect.record is empty; give layer kinds {list(LAYER_KINDS)} "
                              "or layer names")


@dataclass
class LocalizeConfig:
    method: str = "implicit"  # implicit, or explicit_swap: also the swap baseline
    split: str = "prompt"  # prompt: grouped by prompt; image: stratified per image (the paper)
    test_size: float = 0.2  # the held-out share of the single split (folds=1)
    folds: int = 5  # k-fold separability (mean and std over folds); 1: one test_size split
    swap_images: int = 16

    def __post_init__(self) -> None:
        _choice("localize.method", self.method, ("implicit", "explicit_swap"))
        _choice("localize.split", self.split, ("prompt", "image"))
        if not (math.isfinite(self.test_size) and 0 < self.test_size < 1):
            raise ConfigError(f"localize.test_size={self.test_size!r} must be in (0, 1)")
        if self.folds < 1:
            raise ConfigError(f"localize.folds={self.folds!r} must be 1 (one split of "
                              "localize.test_size) or an integer >= 2 (k-fold)")
        _count("localize.swap_images", self.swap_images)


@dataclass
class CausalConfig:
    """The causal map: each candidate layer alone steered toward each class (conf: alpha and the
    window follow steer's, the seed the run's)."""

    n_images: int = 32  # per class: the same images are steered toward every class
    alpha: float = 16.0
    start: float = 0.3
    end: float | None = None
    thirds: bool = False  # also steer in the early, middle and late thirds of all steps
    seed: int = 0

    def __post_init__(self) -> None:
        _count("causal.n_images", self.n_images)
        if not math.isfinite(self.alpha):
            raise ConfigError(f"causal.alpha={self.alpha!r} must be a finite number")
        _fraction("causal.start", self.start, 0.0, 1.0)
        if self.end is not None:
            _fraction("causal.end", self.end, 0.0, 1.0)
        if self.start >= (1.0 if self.end is None else self.end):
            raise ConfigError(f"causal.start={self.start} must be below causal.end="
                              f"{self.end} (null: 1.0)")
        _count("causal.seed", self.seed, minimum=0)


@dataclass
class SteerConfig:
    alpha: float = 16.0
    start: float = 0.3
    end: float | None = None
    halves: str = "cond"
    renorm: bool = False
    direction: str = "mean_diff"
    units: str = "sigma"  # raw: alpha itself; sigma: alpha standard deviations
    policy: str = "all"
    probes: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ConfigError(f"steer.alpha={self.alpha!r} must be a finite number")
        _fraction("steer.start", self.start, 0.0, 1.0)
        if self.end is not None:
            _fraction("steer.end", self.end, 0.0, 1.0)
        if self.start >= (1.0 if self.end is None else self.end):
            raise ConfigError(f"steer.start={self.start} must be below steer.end="
                              f"{self.end} (null: 1.0)")
        _choice("steer.halves", self.halves, ("cond", "both"))
        _choice("steer.direction", self.direction, ("probe", "mean_diff"))
        _choice("steer.units", self.units, STEER_UNITS)
        _choice("steer.policy", self.policy, ("all", "minimal", "paper_batch"))


@dataclass
class EvalConfig:
    n_images_per_prompt: int = 32
    features: str = "clip"  # FID/KID features: clip or inception
    reference_dir: str | None = None
    reference_stats: str | None = None  # .npz of mu, sigma (clean-fid's format), e.g. FFHQ's
    kid_subset_size: int | None = None  # images per KID subset; None: half of the smaller set
    kid_subsets: int = 100  # KID subsets drawn (seeded): kid_std is their spread

    def __post_init__(self) -> None:
        _count("eval.n_images_per_prompt", self.n_images_per_prompt)
        _choice("eval.features", self.features, ("clip", "inception"))
        if self.kid_subset_size is not None:
            _count("eval.kid_subset_size", self.kid_subset_size, minimum=2)
        _count("eval.kid_subsets", self.kid_subsets)


@dataclass
class LayersConfig:
    select: Any = "auto"  # auto, a layer kind, all, or a list of layer names
    kind: str = "attn1"  # layers=auto: the kind ranked
    k: int = 3  # layers=auto: how many
    rank_by: str = "separability"  # layers=auto: separability or causal (the causal map)

    def __post_init__(self) -> None:
        if isinstance(self.select, str):
            _choice("layers.select", self.select, ("auto", "all", *LAYER_KINDS))
        _choice("layers.kind", self.kind, LAYER_KINDS)
        _count("layers.k", self.k)
        # rank_by only ranks layers=auto; named layers (layers.select=[...] inside the auto
        # group, the natural override) are steered as named, with no causal map computed.
        _choice("layers.rank_by", self.rank_by, RANK_BY)


OBJECTIVE_METRICS = ("fd", "fd_soft", "kl", "deviation", "clip_t", "clip_i", "fid", "kid")


@dataclass
class ObjectiveConfig:
    metric: str = "fd"  # the steered metric an optimising sweeper minimises
    clip_i_floor: float | None = None

    def __post_init__(self) -> None:
        _choice("objective.metric", self.metric, OBJECTIVE_METRICS)
        if self.clip_i_floor is not None:
            _fraction("objective.clip_i_floor", self.clip_i_floor, 0.0, 1.0)


@dataclass
class Config:
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    seed: int = 0
    collect: CollectConfig = field(default_factory=CollectConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Components: each is checked by the class its `_target_` names.
    model: Any = MISSING
    method: Any = MISSING
    concept: Any = MISSING
    clip: Any = MISSING
    labeler: Any = MISSING
    probe: Any = MISSING
    logger: Any = MISSING
    paths: Any = MISSING


# Checked in this order: steer before causal, whose alpha and window default to steer's (a bad
# steer.alpha is reported as steer's).
SECTIONS = {"collect": CollectConfig, "localize": LocalizeConfig, "steer": SteerConfig,
            "causal": CausalConfig,
            "eval": EvalConfig, "layers": LayersConfig, "objective": ObjectiveConfig}


def section(cfg: DictConfig, name: str) -> Any:
    """A plain section as its checked dataclass."""
    node = cfg[name]
    if OmegaConf.is_config(node):
        return OmegaConf.to_object(node) if OmegaConf.get_type(node) is SECTIONS[name] else \
            SECTIONS[name](**OmegaConf.to_container(node, resolve=True))
    return node


def register() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
