"""The layer registry: every hook point of a denoiser, read from the model itself.

A hook point is named by its module path inside the denoiser (`pipe.unet` or
`pipe.transformer`), e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn1`, the names
diffusers uses. Architecture knowledge lives in one walker per denoiser class (`_WALKERS`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd
import torch
from diffusers import DiffusionPipeline

LayerKind = Literal["attn1", "attn2", "bottleneck"]
LAYER_KINDS: tuple[LayerKind, ...] = ("attn1", "attn2", "bottleneck")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: LayerKind
    width: int  # channels of the recorded output
    resolution: int  # side of the token grid at the configured image size
    block: str  # down / mid / up for a UNet, the transformer block for a DiT


class UnknownLayerError(KeyError):
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

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(layer) for layer in self.layers])


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network called once per denoising step: a UNet, or a transformer for DiTs."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if module is not None:
            return module
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def _attention_layers(block: torch.nn.Module, prefix: str, resolution: int, where: str):
    for name, module in block.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("attn1", "attn2") and hasattr(module, "to_out"):
            width = module.to_out[0].out_features
            yield LayerInfo(f"{prefix}.{name}", kind, width, resolution, where)


def _unet_layers(unet: torch.nn.Module, latent_size: int) -> Iterator[LayerInfo]:
    resolution = latent_size
    for i, block in enumerate(unet.down_blocks):
        yield from _attention_layers(block, f"down_blocks.{i}", resolution, "down")
        if getattr(block, "downsamplers", None):
            resolution = (resolution + 1) // 2
    mid = unet.mid_block
    yield from _attention_layers(mid, "mid_block", resolution, "mid")
    yield LayerInfo("mid_block", "bottleneck", mid.resnets[-1].out_channels, resolution, "mid")
    for i, block in enumerate(unet.up_blocks):
        yield from _attention_layers(block, f"up_blocks.{i}", resolution, "up")
        if getattr(block, "upsamplers", None):
            resolution *= 2


def _dit_layers(transformer: torch.nn.Module, latent_size: int) -> Iterator[LayerInfo]:
    resolution = latent_size // transformer.config.patch_size
    for i, block in enumerate(transformer.transformer_blocks):
        yield from _attention_layers(block, f"transformer_blocks.{i}", resolution, f"block{i}")


_WALKERS = {
    "UNet2DConditionModel": _unet_layers,
    "SanaTransformer2DModel": _dit_layers,
}


def layer_registry(pipe: DiffusionPipeline, resolution: int) -> LayerRegistry:
    """Read the hook points of `pipe` for images of `resolution` pixels."""
    net = denoiser(pipe)
    walker = _WALKERS.get(type(net).__name__)
    if walker is None:
        raise TypeError(
            f"no layer walker for denoiser {type(net).__name__}; known: {sorted(_WALKERS)}"
        )
    return LayerRegistry(walker(net, resolution // pipe.vae_scale_factor))
