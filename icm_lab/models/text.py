"""The text context each pipeline feeds its cross-attention layers, from its own encoder."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, SanaPipeline, StableDiffusionXLPipeline

from icm_lab.models.layers import denoiser


@torch.no_grad()
def cross_attention_context(
    pipe: DiffusionPipeline, prompts: list[str], call_kwargs: dict[str, Any]
) -> torch.Tensor:
    """`[len(prompts), tokens, dim]`: what `encoder_hidden_states` is at every attn2 layer when the
    pipeline is called with these prompts (the conditional half)."""
    device = pipe.device
    if isinstance(pipe, SanaPipeline):
        sana_kwargs = {k: call_kwargs[k] for k in ("max_sequence_length",
                                                  "complex_human_instruction") if k in call_kwargs}
        embeds, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                        **sana_kwargs)
        net = denoiser(pipe)  # Sana projects and normalises the caption inside the transformer
        return net.caption_norm(net.caption_projection(embeds))
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, *_ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        return embeds
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds
