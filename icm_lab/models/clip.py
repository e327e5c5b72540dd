"""open_clip models: the labeler's and the CLIP-T / CLIP-I scorer's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from omegaconf import DictConfig

from icm_lab.models.loading import resolve_device

# Model configs of our own (tiny random CLIP, the toy world's CLIP), registered with open_clip.
CLIP_CONFIGS = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(CLIP_CONFIGS)


@dataclass
class Clip:
    model: open_clip.CLIP
    preprocess: Callable  # PIL image -> tensor
    tokenizer: Callable  # list[str] -> token tensor
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """Unit image features, `[N, dim]`, encoded `batch_size` images at a time."""
        features = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(image) for image in chunk]).to(self.device)
            features.append(self.model.encode_image(batch).float())
        return torch.nn.functional.normalize(torch.cat(features), dim=-1)


def load_clip(cfg: DictConfig) -> Clip:
    known = open_clip.list_models()
    if cfg.model not in known:
        raise ValueError(f"unknown open_clip model {cfg.model!r}; valid: {known}")
    device = resolve_device(cfg.device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=cfg.pretrained, device=device
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"could not load CLIP {cfg.model!r} with pretrained={cfg.pretrained!r}: {error}\n"
            "Weights come from the Hugging Face cache or a local checkpoint path; offline, pass "
            "clip.pretrained=/path/to/open_clip_model.safetensors."
        ) from error
    model.eval()
    return Clip(model, preprocess, open_clip.get_tokenizer(cfg.model), device, cfg.batch_size)
