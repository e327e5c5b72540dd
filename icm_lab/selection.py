"""Which layers to steer (`layers=`): a kind, explicit names, or the top-k by separability."""

from __future__ import annotations

import math

import pandas as pd
from omegaconf import DictConfig, ListConfig

from icm_lab.models.layers import LayerInfo, LayerRegistry

SCORE = "balanced_accuracy"


def step_window(start: float, end: float | None, n_steps: int) -> range:
    """Steps `[start * n, end * n)` from fractions of the denoising trajectory."""
    stop = 1.0 if end is None else end
    for name, value in (("steer.start", start), ("steer.end", stop)):
        if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    window = range(math.floor(start * n_steps), math.ceil(stop * n_steps))
    if not window:
        raise ValueError(f"the steering window [{start}, {stop}) holds no step of {n_steps}")
    return window


def rank_layers(scores: pd.DataFrame, window: range) -> pd.DataFrame:
    """Layers by mean probe score over the window's steps, best first."""
    inside = scores[scores["step"].isin(list(window))]
    ranking = inside.groupby(["layer", "kind"], sort=False)[SCORE].mean().reset_index()
    return ranking.sort_values(SCORE, ascending=False, ignore_index=True)


def select_layers(spec: DictConfig, registry: LayerRegistry, scores: pd.DataFrame | None,
                  window: range) -> list[LayerInfo]:
    """The layers named by a `layers/*.yaml` config, in registry order (auto: rank order)."""
    select = spec.select
    if isinstance(select, ListConfig | list):
        return registry.select(list(select))
    if select != "auto":
        return registry.select(select)
    if scores is None:
        raise ValueError("layers=auto ranks layers by probe scores: run the localize stage")
    ranking = rank_layers(scores[scores["kind"] == spec.kind], window)
    if ranking.empty:
        raise ValueError(f"layers=auto found no probe scores for kind {spec.kind!r}")
    return [registry[name] for name in ranking["layer"].head(spec.k)]
