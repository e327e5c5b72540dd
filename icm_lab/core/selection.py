"""Which layers to steer (`layers=`): a kind, explicit names, or the top-k by separability over
the steering window or by causal effect (`layers.rank_by`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.layers import LayerInfo, LayerRegistry

SCORE = "balanced_accuracy"
EFFECT = "effect"  # the causal map's shift of the target-class rate
STEERING = "steering"  # the causal map's window that steering uses (others: its thirds)
ALL_CLASSES = "mean"  # the causal map's rows averaged over classes


def step_window(start: float, end: float | None, n_steps: int) -> range:
    """Steps `[start * n, end * n)` from fractions of the denoising trajectory."""
    stop = 1.0 if end is None else end
    for name, value in (("start", start), ("end", stop)):  # the schema names the section's key
        if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
            raise ConfigError(f"the window's {name}={value!r} must be a fraction in [0, 1]")
    window = range(math.floor(start * n_steps), math.ceil(stop * n_steps))
    if not window:
        raise ConfigError(f"the steering window [{start}, {stop}) holds no step of {n_steps}")
    return window


def rank_layers(scores: pd.DataFrame, window: range) -> pd.DataFrame:
    """Layers by mean probe score over the window's steps, best first."""
    inside = scores[scores["step"].isin(list(window))]
    ranking = inside.groupby(["layer", "kind"], sort=False)[SCORE].mean().reset_index()
    return ranking.sort_values(SCORE, ascending=False, ignore_index=True)


def rank_effects(causal: pd.DataFrame) -> pd.DataFrame:
    """Layers by causal effect in the steering window, averaged over classes, largest first
    (ties: larger probability shift, then map order)."""
    rows = causal[(causal["window"] == STEERING) & (causal["class"] == ALL_CLASSES)]
    columns = ["layer", "kind", EFFECT, "ci_low", "ci_high", "prob_shift"]
    return rows[columns].sort_values([EFFECT, "prob_shift"], ascending=False, kind="stable",
                                     ignore_index=True)


@dataclass(frozen=True)
class LayerSelection:
    """`layers=` (a kind, `all`, a list of names, or `auto`: the top `k` of `kind` by
    `rank_by`), with the steering window that `auto` ranks separability over."""

    select: Any
    kind: str
    k: int
    window: range
    rank_by: str  # separability, or causal: by the causal map's effect (layers.rank_by)

    @property
    def ranked(self) -> bool:
        return not isinstance(self.select, list | tuple) and self.select == "auto"

    @property
    def needs_causal_map(self) -> bool:
        return self.ranked and self.rank_by == "causal"

    def resolve(self, registry: LayerRegistry, scores: pd.DataFrame | None,
                causal: pd.DataFrame | None = None) -> list[LayerInfo]:
        """The layers, in registry order (auto: rank order). `causal`: the causal map, which
        `rank_by=causal` ranks by."""
        if isinstance(self.select, list | tuple):
            return registry.select(list(self.select))
        if not self.ranked:
            return registry.select(self.select)
        ranking = self.ranking(scores, causal)
        if ranking.empty:
            raise UserError(f"layers=auto (rank_by={self.rank_by}) found no "
                            f"{str(self.kind)!r} layer to rank")
        return [registry[name] for name in ranking["layer"].head(self.k)]

    def ranking(self, scores: pd.DataFrame | None, causal: pd.DataFrame | None) -> pd.DataFrame:
        """The layers of `kind`, best first, by `rank_by`."""
        if self.rank_by == "causal":
            if causal is None:
                raise UserError("layers.rank_by=causal ranks layers by their causal effect: run "
                                "the causal stage")
            return rank_effects(causal[causal["kind"] == self.kind])
        if scores is None:
            raise UserError("layers=auto ranks layers by probe scores: run the localize stage")
        return rank_layers(scores[scores["kind"] == self.kind], self.window)
