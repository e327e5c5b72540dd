"""open_clip models: the labeler's and the CLIP-T / CLIP-I scorer's."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image

from icm_lab.core.errors import ConfigError, ModelUnavailable, choices_error
from icm_lab.models.loading import hub_offline, like_parameters, local_folder, resolve_device

# Model configs of our own (tiny random CLIP, the toy world's CLIP), registered with open_clip.
CLIP_CONFIGS = Path(__file__).parent / "clip_configs"
open_clip.add_model_config(CLIP_CONFIGS)


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image, from a PIL image or a file: image sets are read a batch at a time."""
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert(
        "RGB")


@dataclass
class Clip:
    """An open_clip model with its transforms. Every encoder moves its inputs to the model's
    device and dtype and returns float32 CPU features, at most `batch_size` inputs per forward
    pass, so thousands of images never sit on the device (or in memory) at once."""

    model: open_clip.CLIP
    preprocess: Callable  # PIL image -> tensor
    tokenizer: Callable  # list[str] -> token tensor
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text features, `[N, dim]`."""
        features = [self.model.encode_text(like_parameters(self.tokenizer(list(chunk)),
                                                           self.model)).float().cpu()
                    for chunk in _batches(texts, self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(features), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Unit image features, `[N, dim]`, of PIL images or image files."""
        features = [self.encode_pixels(torch.stack([self.preprocess(open_image(image))
                                                    for image in chunk]))
                    for chunk in _batches(images, self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(features), dim=-1)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (not normalised), `[N, dim]`, of one batch of preprocessed pixels,
        `[N, 3, S, S]` (callers split image sets into `batch_size` batches)."""
        return self.model.encode_image(like_parameters(pixels, self.model)).float().cpu()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    return (items[start:start + size] for start in range(0, len(items), size))


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs to the root logger that a model without `pretrained` is random (the tiny
    CLIP is so on purpose) and that a download failed (load_clip says so in its own line)."""
    root = logging.getLogger()
    dropped = _DropMessages(("No pretrained weights loaded for model", "Failed to download"))
    root.addFilter(dropped)
    try:
        yield
    finally:
        root.removeFilter(dropped)


def hub_repo(model: str, pretrained: str) -> str | None:
    """The Hugging Face repo an open_clip tag's weights come from (None: a URL or no tag)."""
    hub = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "")
    return os.path.split(hub)[0] or None


def check_available(model: str, pretrained: str | None) -> None:
    """Refuse an open_clip tag that is not a tag of `model`, or whose weights are neither cached
    nor downloadable (HF_HUB_OFFLINE), before anything is loaded or written."""
    if not pretrained or Path(pretrained).exists():
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not tags:
        raise ConfigError(f"clip.pretrained={pretrained!r} is not a file, and {model} has no "
                          "pretrained tags; pass the path of a checkpoint")
    if pretrained not in tags:
        raise choices_error("clip.pretrained", pretrained, tags, f" for clip.model={model}")
    check_activation(model, pretrained)
    repo = hub_repo(model, pretrained)
    if repo and hub_offline() and not local_folder(repo):
        raise _not_here(model, pretrained, repo, "are not in the Hugging Face cache, and "
                        "HF_HUB_OFFLINE=1 forbids downloading them")


def tag_quick_gelu(model: str, pretrained: str) -> bool:
    """Whether the weights of an open_clip tag were trained with QuickGELU (OpenAI's were)."""
    return bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))


def builds_quick_gelu(model: str) -> bool:
    """Whether open_clip builds `model` with QuickGELU (`ViT-L-14-quickgelu`) or GELU."""
    return bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))


def check_activation(model: str, pretrained: str) -> None:
    """Refuse weights trained with another activation than the model builds: open_clip 3.x only
    warns, and every label, CLIP-T and CLIP-I would be silently shifted."""
    wanted = tag_quick_gelu(model, pretrained)
    if wanted == builds_quick_gelu(model):
        return
    names = {True: "QuickGELU", False: "GELU"}
    fixed = f"{model}-quickgelu" if wanted else model.removesuffix("-quickgelu")
    hint = f"; use clip.model={fixed}" if fixed in open_clip.list_models() else ""
    raise ConfigError(f"clip.pretrained={pretrained} was trained with {names[wanted]}, but "
                      f"clip.model={model} builds {names[not wanted]}{hint}")


def _not_here(model: str, pretrained: str, repo: str, why: str) -> ModelUnavailable:
    """Missing CLIP weights: what is wrong, and the commands that fix it."""
    return ModelUnavailable(
        f"CLIP {model} ({pretrained}) needs the weights {repo!r}, which {why}. Run `hf "
        f"download {repo}` where there is network, or pass clip.pretrained=/path/to/"
        "open_clip_model.safetensors")


def load_clip(model: str, pretrained: str | None = None, device: str = "auto",
              batch_size: int = 32) -> Clip:
    """An open_clip model (`conf/clip/*.yaml`): `pretrained` is an open_clip tag or a path."""
    known = open_clip.list_models()
    if model not in known:
        raise choices_error("clip.model", model, known)
    check_available(model, pretrained)
    torch_device = resolve_device(device)
    try:
        with _quiet_open_clip():
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=torch_device)
    except RuntimeError as error:
        repo = hub_repo(model, pretrained) if pretrained and not Path(pretrained).exists() \
            else None
        if repo and not local_folder(repo):  # the Hub could not be reached
            raise _not_here(model, pretrained, repo, "are not in the Hugging Face cache and "
                            "could not be downloaded from the Hub") from error
        raise ModelUnavailable(f"could not load CLIP {model} with pretrained={pretrained!r}: "
                               f"{str(error).splitlines()[0][:300]}; pass clip.pretrained="
                               "/path/to/open_clip_model.safetensors") from error
    net.eval()
    return Clip(net, preprocess, open_clip.get_tokenizer(model), torch_device, batch_size)
