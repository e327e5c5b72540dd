"""The layer registry: every hook point of a denoiser, read from the model itself.

A hook point is named by its module path inside the denoiser (`pipe.unet` or
`pipe.transformer`), e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn1`, the names
diffusers uses. The walkers that read them live in the family adapters (`adapters.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd

from icm_lab.core.errors import ConfigError

LayerKind = Literal["attn1", "attn2", "bottleneck"]
LAYER_KINDS: tuple[LayerKind, ...] = ("attn1", "attn2", "bottleneck")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: LayerKind
    width: int  # channels of the recorded output
    resolution: int  # side of the token grid at the configured image size
    block: str  # down / mid / up for a UNet, the transformer block for a DiT


class UnknownLayerError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class LayerRegistry:
    """The ordered hook points of one denoiser (execution order: down, mid, up)."""

    def __init__(self, layers: Iterable[LayerInfo]):
        self.layers = list(layers)
        self._by_name = {layer.name: layer for layer in self.layers}

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerInfo:
        if name not in self._by_name:
            close = difflib.get_close_matches(name, self._by_name, n=3, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else ""
            raise UnknownLayerError(
                f"unknown layer {name!r}.{hint} Valid layers ({len(self)}): {self.names()}"
            )
        return self._by_name[name]

    def names(self, kind: str | None = None) -> list[str]:
        return [layer.name for layer in self.layers if kind in (None, "all", layer.kind)]

    def select(self, spec: str | Iterable[str]) -> list[LayerInfo]:
        """Layers from a kind (`attn1`, `attn2`, `bottleneck`, `all`) or a list of names."""
        if isinstance(spec, str):
            if spec not in (*LAYER_KINDS, "all"):
                raise UnknownLayerError(
                    f"unknown layer kind {spec!r}; valid kinds: {[*LAYER_KINDS, 'all']}, "
                    "or give a list of layer names"
                )
            return [self._by_name[name] for name in self.names(spec)]
        return [self[name] for name in spec]

    def resolve(self, items: Iterable[str]) -> list[LayerInfo]:
        """Layer kinds and/or names (`collect.record`), each layer once, in registry order."""
        chosen: set[str] = set()
        for item in items:
            is_kind = item in (*LAYER_KINDS, "all")
            chosen.update(layer.name for layer in self.select(item if is_kind else [item]))
        return [layer for layer in self.layers if layer.name in chosen]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(layer) for layer in self.layers])
