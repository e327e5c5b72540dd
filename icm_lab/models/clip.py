"""open_clip models: the labeler's and the CLIP-T / CLIP-I scorer's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from icm_lab.errors import ModelUnavailable, choices_error
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


def load_clip(model: str, pretrained: str | None = None, device: str = "auto",
              batch_size: int = 32) -> Clip:
    """An open_clip model (`conf/clip/*.yaml`): `pretrained` is an open_clip tag or a path."""
    known = open_clip.list_models()
    if model not in known:
        raise choices_error("clip.model", model, known)
    torch_device = resolve_device(device)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=torch_device
        )
    except RuntimeError as error:
        raise ModelUnavailable(
            f"could not load CLIP {model!r} with pretrained={pretrained!r}: "
            f"{str(error).splitlines()[0]} Weights come from the Hugging Face cache or a local "
            "checkpoint; offline, pass clip.pretrained=/path/to/open_clip_model.safetensors."
        ) from error
    net.eval()
    return Clip(net, preprocess, open_clip.get_tokenizer(model), torch_device, batch_size)
