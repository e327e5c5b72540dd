"""Structured config schemas: the types, ranges and allowed values of the plain config sections,
registered in Hydra's ConfigStore as the base of `conf/config.yaml`.

These dataclasses are the one source of every default and every choice: the YAML files pick
components and set only what differs (tests/test_config_defaults.py refuses a value that merely
repeats a default unless its comment says `pinned`). Types and choices are checked when the
config is composed: a choice is a `StrEnum`, so OmegaConf refuses `steer.units=std` and lists
the valid values (`collect.n_images=abc` is refused likewise); ranges when a section becomes
its dataclass (`section(cfg, "steer")`), which the validation pass does before anything is
loaded or written. Sections that are components
(`model`, `method`, `probe`, `labeler`, `clip`, `logger`) are checked by their own classes when
instantiated, and `concept` by `Concept.from_config`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, is_dataclass
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from icm_lab.core.errors import ConfigError, choices_error
from icm_lab.core.layers import LAYER_KINDS

# Stages run in data-flow order; each is skipped when its artefacts exist with the same
# fingerprint. `causal` is optional: asked for (stages=[...]), or needed by layers.rank_by=causal.
STAGES = ("collect", "localize", "causal", "steer", "evaluate")
DEFAULT_STAGES = ("collect", "localize", "steer", "evaluate")


# The choices. Each member's name is its value, as it is written in YAML and on the command line.
class LocalizeMethod(StrEnum):
    implicit = "implicit"  # probes per (layer, step)
    explicit_swap = "explicit_swap"  # also the explicit-swap baseline map


class Split(StrEnum):
    prompt = "prompt"  # grouped: no prompt on both sides
    image = "image"  # stratified per image (the paper)


class Halves(StrEnum):
    cond = "cond"  # the conditional half of the CFG batch
    both = "both"  # both halves


class Direction(StrEnum):
    probe = "probe"  # the fitted probe's w / scale, unit-normalised (the paper's)
    mean_diff = "mean_diff"  # the same from the difference of class means


class Units(StrEnum):
    raw = "raw"  # alpha times a unit direction (the paper's alpha)
    sigma = "sigma"  # alpha standard deviations of the activations along the direction


class Policy(StrEnum):
    all = "all"  # steer every sample, exact target counts
    minimal = "minimal"  # steer only as many as the base labels need
    paper_batch = "paper_batch"  # one class drawn at random per batch of 16 (the paper's)


class Features(StrEnum):
    clip = "clip"  # the configured CLIP's image tower
    inception = "inception"  # torchmetrics' Inception (the paper's FID)


class RankBy(StrEnum):
    separability = "separability"  # mean probe score over the steering window (the paper's)
    causal = "causal"  # the causal map's mean shift of the target-class rate


LayerKind = StrEnum("LayerKind", [(kind, kind) for kind in LAYER_KINDS])


class Metric(StrEnum):
    fd = "fd"
    fd_soft = "fd_soft"
    kl = "kl"
    deviation = "deviation"
    clip_t = "clip_t"
    clip_i = "clip_i"
    fid = "fid"
    kid = "kid"


def _window(key: str, start: float, end: float | None) -> None:
    """A steering window `[start, end)` in fractions of the trajectory (end None: 1.0)."""
    _fraction(f"{key}.start", start, 0.0, 1.0)
    if end is not None:
        _fraction(f"{key}.end", end, 0.0, 1.0)
    if start >= (1.0 if end is None else end):
        raise ConfigError(f"{key}.start={start} must be below {key}.end={end} (null: 1.0)")


def _choice(key: str, value: str, valid: type[StrEnum]) -> StrEnum:
    """`value` as a member of `valid`, for sections built from plain dicts (composed configs
    are checked by OmegaConf already)."""
    if value not in set(valid):
        raise choices_error(key, value, [member.value for member in valid])
    return valid(value)


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
    record: list[str] = field(default_factory=lambda: list(LAYER_KINDS))  # kinds or layer names
    shard: int = 0  # with num_shards=n, this job writes batches shard, shard+n, ... (merged)
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
    method: LocalizeMethod = LocalizeMethod.implicit
    split: Split = Split.prompt
    test_size: float = 0.2  # the held-out share of the single split (folds=1)
    # Separability is the mean (and std) of held-out balanced accuracy over this many folds,
    # grouped/stratified as `split` says; 1: one split of test_size. Steering directions are
    # always fitted on all decided images.
    folds: int = 5
    swap_images: int = 16  # explicit_swap: images per (attn2 layer, class)

    def __post_init__(self) -> None:
        self.method = _choice("localize.method", self.method, LocalizeMethod)
        self.split = _choice("localize.split", self.split, Split)
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

    n_images: int = 32  # per class: the same images (own seed stream) toward every class
    # In sigma units whatever steer.units is: layers are compared at one calibrated push, and
    # one map serves every steer.alpha of a sweep (it depends on the window, not the strength).
    alpha: float = 16.0
    start: float = 0.3
    end: float | None = None
    thirds: bool = False  # also steer in the early, middle and late thirds of all steps
    seed: int = 0

    def __post_init__(self) -> None:
        _count("causal.n_images", self.n_images)
        if not math.isfinite(self.alpha):
            raise ConfigError(f"causal.alpha={self.alpha!r} must be a finite number")
        _window("causal", self.start, self.end)
        _count("causal.seed", self.seed, minimum=0)


@dataclass
class SteerConfig:
    """Steering: add alpha * v (the direction of each sample's target class) from step `start`
    to `end` (fractions of the trajectory) on the selected layers. `method=` picks what is
    steered. On the toy world (labeler=oracle) sigma 16 cuts the FD to 0.10 where raw 15 reaches
    0.27, and mean_diff directions steer where logreg's barely do (docs/method.md); the paper's
    experiments pin raw units, alpha 15 and probe directions."""

    alpha: float = 16.0  # in `units`
    start: float = 0.3  # the paper skipped the first 15 of 50 steps
    end: float | None = None  # None: to the last step
    halves: Halves = Halves.cond
    renorm: bool = False  # rescale each token back to its original norm after the addition
    direction: Direction = Direction.mean_diff
    units: Units = Units.sigma  # every method (baselines, random control) is scaled alike
    policy: Policy = Policy.all
    probes: str | None = None  # a probe set directory to steer with instead of this run's

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ConfigError(f"steer.alpha={self.alpha!r} must be a finite number")
        _window("steer", self.start, self.end)
        self.halves = _choice("steer.halves", self.halves, Halves)
        self.direction = _choice("steer.direction", self.direction, Direction)
        self.units = _choice("steer.units", self.units, Units)
        self.policy = _choice("steer.policy", self.policy, Policy)


@dataclass
class EvalConfig:
    """Evaluation: every evaluation prompt of the concept, base and steered from the same seeds,
    then fairness, FID/KID, CLIP-T and CLIP-I (metrics.json)."""

    n_images_per_prompt: int = 32
    features: Features = Features.clip  # FID/KID features
    reference_dir: str | None = None  # reference images for a second FID/KID
    # .npz of mu, sigma (clean-fid's format), e.g. FFHQ's; `python -m icm_lab reference-stats
    # FOLDER OUT.npz eval.features=inception` writes one
    reference_stats: str | None = None
    kid_subset_size: int | None = None  # images per KID subset; None: half of the smaller set
    kid_subsets: int = 100  # KID subsets drawn (seeded): kid_std is their spread

    def __post_init__(self) -> None:
        _count("eval.n_images_per_prompt", self.n_images_per_prompt)
        self.features = _choice("eval.features", self.features, Features)
        if self.kid_subset_size is not None:
            _count("eval.kid_subset_size", self.kid_subset_size, minimum=2)
        _count("eval.kid_subsets", self.kid_subsets)


@dataclass
class LayersConfig:
    """Which layers steer. `auto` ranks the layers of `kind` and keeps `k`: by causal effect by
    default, since on the toy world's ground truth the most separable layers are not the ones
    that steer (README, "The toy world"), or by separability, the paper's way."""

    select: Any = "auto"  # auto, a layer kind, all, or a list of layer names
    kind: LayerKind = LayerKind.attn1  # layers=auto: the kind ranked
    k: int = 3  # layers=auto: how many
    rank_by: RankBy = RankBy.causal  # layers=auto only

    def __post_init__(self) -> None:
        if isinstance(self.select, str):
            if self.select not in ("auto", "all", *LAYER_KINDS):
                raise choices_error("layers.select", self.select, ["auto", "all", *LAYER_KINDS])
        self.kind = _choice("layers.kind", self.kind, LayerKind)
        _count("layers.k", self.k)
        # rank_by only ranks layers=auto; named layers (layers.select=[...] inside the auto
        # group, the natural override) are steered as named, with no causal map computed.
        self.rank_by = _choice("layers.rank_by", self.rank_by, RankBy)


@dataclass
class ObjectiveConfig:
    metric: Metric = Metric.fd  # the steered metric an optimising sweeper minimises
    clip_i_floor: float | None = None

    def __post_init__(self) -> None:
        self.metric = _choice("objective.metric", self.metric, Metric)
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


def choices_of(section_type: Any, key: Any) -> list[str] | None:
    """The valid values of a section's choice field (`SteerConfig`, "units": raw, sigma), or
    None if it is no choice: what a one-line refusal lists."""
    if not (isinstance(section_type, type) and isinstance(key, str)):
        return None
    kind = typing.get_type_hints(section_type).get(key) if is_dataclass(section_type) else None
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return [member.value for member in kind]
    return None


def register() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
