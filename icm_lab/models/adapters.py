"""One adapter per model family: the only code that knows module paths and call conventions.

A family is a denoiser class. `UNetAdapter` covers `UNet2DConditionModel` (SD1.5, SDXL, the toy
world); `DiTAdapter` covers `SanaTransformer2DModel`. An adapter owns:
- the layer walker: hook points named by their module path in the denoiser, e.g.
  `up_blocks.1.attentions.0.transformer_blocks.0.attn1` (diffusers' own names);
- the denoiser's forward-argument names and the CFG half order;
- the text context that reaches the cross-attention layers (the explicit-swap baseline);
- the attn1 -> attn2 pairing (the `attn2` baseline), short display names, the VAE's scale.
A new family is one new adapter in `ADAPTERS`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers import DiffusionPipeline

from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.layers import LayerInfo, LayerRegistry


class TextContext(NamedTuple):
    """What every cross-attention layer receives for some prompts (the conditional half):
    `context` is `encoder_hidden_states`, `[len(prompts), tokens, dim]`; `mask` is the text
    attention mask in the form attn2 receives it as `attention_mask`, or None for families
    whose attn2 gets no mask (SD1.5, SDXL)."""

    context: torch.Tensor
    mask: torch.Tensor | None = None


class ModelAdapter:
    denoiser_class: ClassVar[str]  # the diffusers class this adapter knows
    short_name_key: ClassVar[str]  # how short_name abbreviates, for readers of tables
    denoiser_attr: ClassVar[str]  # the pipeline attribute that holds the denoiser
    sample_arg: ClassVar[str]  # the denoiser's forward argument carrying the latents
    timestep_arg: ClassVar[str] = "timestep"
    # diffusers pipelines stack a CFG batch as [uncond | cond]: the conditional half is last.
    cond_half_last: ClassVar[bool] = True

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def walk(self, net: torch.nn.Module, latent_size: int) -> Iterator[LayerInfo]:
        raise NotImplementedError

    def vae_scale_factor(self, vae_config: dict[str, Any]) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def text_context(self, pipe: DiffusionPipeline, prompts: list[str],
                     call_kwargs: dict[str, Any]) -> TextContext:
        """What every attn2 layer receives when the pipeline is called with these prompts and
        `call_kwargs` (the conditional half)."""
        raise NotImplementedError

    def cross_attention_of(self, layer: LayerInfo, registry: LayerRegistry) -> LayerInfo:
        """The cross-attention layer of the block that holds `layer` (itself if it is one)."""
        if layer.kind == "attn2":
            return layer
        if layer.kind != "attn1":
            raise ConfigError(f"layer {layer.name!r} ({layer.kind}) has no cross-attention "
                              "partner; method=attn2 needs attn1 or attn2 layers")
        return registry[layer.name.removesuffix("attn1") + "attn2"]

    def short_name(self, name: str) -> str:
        return name

    def owns(self, name: str) -> bool:
        """Whether a layer name follows this family's module paths."""
        raise NotImplementedError


def _attention_layers(block: torch.nn.Module, prefix: str, resolution: int,
                      where: str) -> Iterator[LayerInfo]:
    for name, module in block.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("attn1", "attn2") and hasattr(module, "to_out"):
            width = module.to_out[0].out_features
            yield LayerInfo(f"{prefix}.{name}", kind, width, resolution, where)


class UNetAdapter(ModelAdapter):
    denoiser_class = "UNet2DConditionModel"
    denoiser_attr = "unet"
    sample_arg = "sample"

    def walk(self, net: torch.nn.Module, latent_size: int) -> Iterator[LayerInfo]:
        resolution = latent_size
        for i, block in enumerate(net.down_blocks):
            yield from _attention_layers(block, f"down_blocks.{i}", resolution, "down")
            if getattr(block, "downsamplers", None):
                resolution = (resolution + 1) // 2
        mid = net.mid_block
        yield from _attention_layers(mid, "mid_block", resolution, "mid")
        yield LayerInfo("mid_block", "bottleneck", mid.resnets[-1].out_channels, resolution,
                        "mid")
        for i, block in enumerate(net.up_blocks):
            yield from _attention_layers(block, f"up_blocks.{i}", resolution, "up")
            if getattr(block, "upsamplers", None):
                resolution *= 2

    def vae_scale_factor(self, vae_config: dict[str, Any]) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @torch.no_grad()
    def text_context(self, pipe: DiffusionPipeline, prompts: list[str],
                     call_kwargs: dict[str, Any]) -> TextContext:
        # SD1.5 and SDXL share these keywords; SDXL also returns pooled embeddings, unused here.
        # Their attn2 gets no text mask: every one of the 77 tokens is attended to.
        return TextContext(pipe.encode_prompt(prompt=prompts, device=pipe.device,
                                              num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)[0])

    short_name_key = ("up1.a0.t0 is up_blocks.1.attentions.0.transformer_blocks.0 (down/up "
                      "block, attention a, transformer block t; mid = mid_block)")

    def short_name(self, name: str) -> str:
        """`up_blocks.1.attentions.0.transformer_blocks.0.attn1` -> `up1.a0.t0`."""
        short = re.sub(r"(down|up)_blocks\.(\d+)", r"\1\2", name)
        short = short.replace("mid_block", "mid").replace("transformer_blocks.", "t")
        short = short.replace("attentions.", "a")
        return re.sub(r"\.attn[12]$", "", short)

    def owns(self, name: str) -> bool:
        return re.match(r"(down_blocks|up_blocks)\.\d+|mid_block", name) is not None


class DiTAdapter(ModelAdapter):
    denoiser_class = "SanaTransformer2DModel"
    denoiser_attr = "transformer"
    sample_arg = "hidden_states"

    def walk(self, net: torch.nn.Module, latent_size: int) -> Iterator[LayerInfo]:
        resolution = latent_size // net.config.patch_size
        for i, block in enumerate(net.transformer_blocks):
            yield from _attention_layers(block, f"transformer_blocks.{i}", resolution,
                                         f"block{i}")

    def vae_scale_factor(self, vae_config: dict[str, Any]) -> int:
        return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)

    # The pipeline's own prompt-encoding options (SanaPipeline.__call__ -> encode_prompt).
    encode_options: ClassVar[tuple[str, ...]] = (
        "clean_caption", "max_sequence_length", "complex_human_instruction")

    @torch.no_grad()
    def text_context(self, pipe: DiffusionPipeline, prompts: list[str],
                     call_kwargs: dict[str, Any]) -> TextContext:
        embeds, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                              device=pipe.device,
                                              **self.call_encode_options(pipe, call_kwargs))
        net = self.denoiser(pipe)  # Sana projects and normalises the caption in the transformer
        context = net.caption_norm(net.caption_projection(embeds))
        # SanaTransformer2DModel.forward turns the [batch, tokens] 0/1 mask into this additive
        # bias before its blocks pass it to attn2 as `attention_mask`.
        bias = ((1 - mask.to(context.dtype)) * -10000.0).unsqueeze(1)
        return TextContext(context, bias)

    def call_encode_options(self, pipe: DiffusionPipeline,
                            call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The options `pipe(...)` hands `encode_prompt` when called with `call_kwargs`: what
        the call does not set comes from `__call__`'s defaults, which for Sana include the long
        complex human instruction prefixed to every prompt."""
        defaults = inspect.signature(type(pipe).__call__).parameters
        return {k: call_kwargs[k] if k in call_kwargs else defaults[k].default
                for k in self.encode_options if k in defaults}

    short_name_key = "t3 is Sana's transformer_blocks.3"

    def short_name(self, name: str) -> str:
        """`transformer_blocks.3.attn1` -> `t3`."""
        return re.sub(r"\.attn[12]$", "", name.replace("transformer_blocks.", "t"))

    def owns(self, name: str) -> bool:
        return name.startswith("transformer_blocks.")


ADAPTERS: dict[str, ModelAdapter] = {
    adapter.denoiser_class: adapter for adapter in (UNetAdapter(), DiTAdapter())
}


def adapter_for_class(denoiser_class: str) -> ModelAdapter:
    if denoiser_class not in ADAPTERS:
        raise UserError(f"no model adapter for denoiser {denoiser_class}; known: "
                        f"{sorted(ADAPTERS)} (icm_lab/models/adapters.py)")
    return ADAPTERS[denoiser_class]


def adapter_for(pipe: DiffusionPipeline) -> ModelAdapter:
    """The adapter of the pipeline's denoiser (a UNet, or a transformer for DiTs)."""
    for adapter in ADAPTERS.values():
        net = getattr(pipe, adapter.denoiser_attr, None)
        if net is not None and type(net).__name__ == adapter.denoiser_class:
            return adapter
    nets = [type(getattr(pipe, a.denoiser_attr, None)).__name__ for a in ADAPTERS.values()]
    raise UserError(f"{type(pipe).__name__} has no denoiser with an adapter (found {nets}); "
                    f"known: {sorted(ADAPTERS)}")


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    return adapter_for(pipe).denoiser(pipe)


def layer_registry(pipe: DiffusionPipeline, resolution: int) -> LayerRegistry:
    """The hook points of `pipe` for images of `resolution` pixels."""
    adapter = adapter_for(pipe)
    return LayerRegistry(adapter.walk(adapter.denoiser(pipe),
                                      resolution // pipe.vae_scale_factor))


def block_name(name: str) -> str:
    """A layer's module path without its attention suffix (figures name the kind apart)."""
    return re.sub(r"\.attn[12]$", "", name)


def short_name_key() -> str:
    """What the short names of every family stand for."""
    return "Layer names are short: " + "; ".join(a.short_name_key for a in ADAPTERS.values()) \
        + "."


def short_name(name: str) -> str:
    """A layer's short display name, by the family whose module paths it follows (tables read
    layer names from disk, with no pipeline at hand)."""
    for adapter in ADAPTERS.values():
        if adapter.owns(name):
            return adapter.short_name(name)
    return name
