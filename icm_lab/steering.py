"""Steering plans: which sample goes to which class, and the interventions that take it there.

Target assignment is exact, not random per batch: within each prompt the counts of every class
match the target distribution by the largest-remainder rule, and which sample gets which target
is a seeded shuffle. The `minimal` policy looks at the unsteered (base) labels first and steers
only the samples needed to reach those counts, leaving the rest untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from icm_lab.hooks import AddVector
from icm_lab.models.layers import LayerInfo, LayerRegistry
from icm_lab.probeset import ProbeSet

METHODS = ("none", "icm", "attn2", "all_layers", "hspace", "random", "prompt")
LAYER_METHODS = ("icm", "attn2", "all_layers", "hspace", "random")  # the ones that add vectors
POLICIES = ("all", "minimal")
UNTOUCHED = -1


def largest_remainder(n: int, target: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, as close to n * target as possible."""
    exact = n * np.asarray(target, dtype=float)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")  # ties: the earlier class
    counts[order[: n - counts.sum()]] += 1
    return counts


def assign_targets(n: int, target: np.ndarray, seed: int, policy: str = "all",
                   base: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the class index to steer towards, or UNTOUCHED.

    `all`: every sample is steered; class counts follow the target exactly. `minimal`: `base`
    holds each sample's unsteered class (-1: undecided); samples of a class are kept untouched up
    to that class's count, and only the others are steered to the classes still short.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown steer.policy {policy!r}; valid: {list(POLICIES)}")
    counts = largest_remainder(n, target)
    rng = np.random.default_rng(seed)
    if policy == "all":
        return rng.permutation(np.repeat(np.arange(len(counts)), counts))
    if base is None or len(base) != n:
        raise ValueError("the minimal policy needs the base label of every sample")
    targets = np.full(n, UNTOUCHED)
    pool = []
    for k, count in enumerate(counts):
        members = rng.permutation(np.flatnonzero(base == k))
        pool.extend(members[count:])  # surplus of class k must move
        counts[k] -= min(count, len(members))
    pool.extend(np.flatnonzero(~np.isin(base, np.arange(len(counts)))))  # undecided
    pool = rng.permutation(np.array(pool, dtype=int))
    targets[pool] = np.repeat(np.arange(len(counts)), counts)
    return targets


DIRECTIONS = ["probe", "mean_diff"]  # which of the probe set's directions steer (ProbeSet)


@dataclass(frozen=True)
class SteerSettings:
    method: str
    alpha: float
    window: range
    halves: str = "cond"
    renorm: bool = False
    seed: int = 0
    direction: str = "probe"  # probe: the fitted probe's w / scale; mean_diff: class means'

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {list(METHODS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown steer.direction {self.direction!r}; valid: {DIRECTIONS}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"steer.alpha must be a finite number, got {self.alpha!r}")


def steered_layers(method: str, chosen: Sequence[LayerInfo],
                   registry: LayerRegistry) -> list[LayerInfo]:
    """The layers a method writes to, given the `layers=` selection."""
    if method in ("icm", "random"):
        return list(chosen)
    if method == "attn2":  # the same blocks' cross-attention: isolates self vs cross
        return [registry[layer.name.removesuffix("attn1") + "attn2"] if layer.kind == "attn1"
                else layer for layer in chosen]
    if method == "all_layers":
        return registry.select("attn1") + registry.select("attn2")
    if method == "hspace":
        return registry.select("bottleneck")
    return []


def interventions(settings: SteerSettings, layers: Sequence[LayerInfo], probes: ProbeSet | None,
                  targets: np.ndarray, n_steps: int, n_classes: int) -> list[AddVector]:
    """One AddVector per layer: alpha times the unit direction of each sample's target class at
    each step, zero for untouched samples (which then stay bit-identical to their base)."""
    steered = torch.from_numpy(targets != UNTOUCHED)
    classes = torch.from_numpy(np.where(targets == UNTOUCHED, 0, targets))
    result = []
    for i, layer in enumerate(layers):
        directions = _directions(settings, layer, probes, n_steps, n_classes, i)  # [S, K, W]
        vectors = directions[:, classes].transpose(0, 1) * settings.alpha  # [B, S, W]
        vectors[~steered] = 0
        result.append(AddVector(layer.name, vectors.float(), start=settings.window.start,
                                end=settings.window.stop, halves=settings.halves,
                                renorm=settings.renorm))
    return result


def _directions(settings: SteerSettings, layer: LayerInfo, probes: ProbeSet | None,
                n_steps: int, n_classes: int, index: int) -> torch.Tensor:
    if settings.method == "random":  # the control: random unit directions, same alpha
        g = torch.Generator().manual_seed(settings.seed * 1000 + index)
        return torch.nn.functional.normalize(
            torch.randn(n_steps, n_classes, layer.width, generator=g), dim=-1)
    if probes is None:
        raise ValueError(f"method {settings.method!r} needs probes: run the localize stage")
    if layer.name not in probes.layers:
        raise ValueError(f"no probes for layer {layer.name!r} (method {settings.method!r}); the "
                         f"probe set at {probes.root} covers {len(probes.layers)} layers: "
                         f"{probes.layers}. Record it in collect.record and localize again.")
    directions = probes.directions(layer.name, settings.direction)
    if directions.shape[0] != n_steps:
        raise ValueError(f"probes at {probes.root} have {directions.shape[0]} steps but the "
                         f"model runs {n_steps}")
    return directions
