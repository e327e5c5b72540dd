"""Which layers to steer (`layers=`): a kind, explicit names, or the top-k by separability over
the steering window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from icm_lab.errors import ConfigError, UserError
from icm_lab.models.layers import LayerInfo, LayerRegistry

SCORE = "balanced_accuracy"


def step_window(start: float, end: float | None, n_steps: int) -> range:
    """Steps `[start * n, end * n)` from fractions of the denoising trajectory."""
    stop = 1.0 if end is None else end
    for name, value in (("steer.start", start), ("steer.end", stop)):
        if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
            raise ConfigError(f"{name}={value!r} must be a fraction in [0, 1]")
    window = range(math.floor(start * n_steps), math.ceil(stop * n_steps))
    if not window:
        raise ConfigError(f"the steering window [{start}, {stop}) holds no step of {n_steps}")
    return window


def rank_layers(scores: pd.DataFrame, window: range) -> pd.DataFrame:
    """Layers by mean probe score over the window's steps, best first."""
    inside = scores[scores["step"].isin(list(window))]
    ranking = inside.groupby(["layer", "kind"], sort=False)[SCORE].mean().reset_index()
    return ranking.sort_values(SCORE, ascending=False, ignore_index=True)


@dataclass(frozen=True)
class LayerSelection:
    """`layers=` (a kind, `all`, a list of names, or `auto`: the top `k` of `kind`), with the
    steering window that `auto` ranks over."""

    select: Any
    kind: str
    k: int
    window: range

    @property
    def ranked(self) -> bool:
        return not isinstance(self.select, list | tuple) and self.select == "auto"

    def resolve(self, registry: LayerRegistry, scores: pd.DataFrame | None) -> list[LayerInfo]:
        """The layers, in registry order (auto: rank order)."""
        if isinstance(self.select, list | tuple):
            return registry.select(list(self.select))
        if not self.ranked:
            return registry.select(self.select)
        if scores is None:
            raise UserError("layers=auto ranks layers by probe scores: run the localize stage")
        ranking = rank_layers(scores[scores["kind"] == self.kind], self.window)
        if ranking.empty:
            raise UserError(f"layers=auto found no probe scores for kind {self.kind!r}")
        return [registry[name] for name in ranking["layer"].head(self.k)]
