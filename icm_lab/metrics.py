"""Evaluation metrics (docs/method.md, Metrics).

Fairness, from hard frequencies f (share of decided images per class), soft frequencies p (mean
class probability) and a target distribution u:
    FD = ||f - u||_2,  FD_soft = ||p - u||_2,  KL = sum_k f_k log(f_k / u_k),
    deviation = max_k |f_k - u_k| / max_k (1 - u_k).
Undecided images never count towards f; they are counted and reported.
CLIP-T / CLIP-I: the mean of (cos + 1) / 2 between image and prompt / steered and base image.
FID / KID through torchmetrics, on Inception or CLIP image-tower features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from icm_lab.errors import ModelUnavailable, UserError
from icm_lab.labeler import UNDECIDED
from icm_lab.models.clip import Clip


def fairness(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
             target: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels)
    n_undecided = int((labels == UNDECIDED).sum())
    n_decided = len(labels) - n_undecided
    if len(labels) == 0:
        raise ValueError("fairness needs at least one image, got zero")
    hard = np.array([(labels == k).sum() for k in classes], dtype=float)
    hard = hard / n_decided if n_decided else np.full(len(classes), np.nan)
    with warnings.catch_warnings():  # all-NaN columns (no image had a reading) give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        soft = np.nanmean(np.asarray(probs, dtype=float), axis=0)  # NaN rows have no reading
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_terms = np.where(hard > 0, hard * np.log(hard / target), 0.0)
    return {
        "fd": float(np.linalg.norm(hard - target)),
        "fd_soft": float(np.linalg.norm(soft - target)),
        "kl": float(kl_terms.sum()),
        "deviation": float(np.abs(hard - target).max() / (1 - target).max()),
        "n_images": len(labels),
        "n_undecided": n_undecided,
        **{f"share_{k}": float(v) for k, v in zip(classes, hard, strict=True)},
    }


def fairness_by_prompt(table: pd.DataFrame, label: str, prob_prefix: str,
                       classes: Sequence[str], target: np.ndarray) -> dict:
    """Per prompt, then averaged over prompts (NaN-aware), plus the pooled counts."""
    columns = [f"{prob_prefix}{k}" for k in classes]
    per_prompt = {
        prompt: fairness(rows[label], rows[columns].to_numpy(), classes, target)
        for prompt, rows in table.groupby("prompt", sort=False)
    }
    frame = pd.DataFrame(per_prompt).T
    averaged = {key: float(np.nanmean(frame[key].astype(float)))
                for key in ("fd", "fd_soft", "kl", "deviation")}
    return {**averaged, "n_images": len(table), "n_undecided": int(frame["n_undecided"].sum()),
            "per_prompt": per_prompt}


def clip_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between matching rows of unit feature matrices."""
    return ((a * b).sum(dim=-1) + 1) / 2


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image tower as a torchmetrics feature extractor: float images in [0, 1],
    `[N, 3, H, W]`, resized and normalised as CLIP expects, to `[N, embed_dim]` features."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        visual = clip.model.visual
        self.size = visual.image_size if isinstance(visual.image_size, tuple) else (
            visual.image_size, visual.image_size)
        mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("std", torch.tensor(std)[:, None, None])
        self.num_features = clip.model.visual.output_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.nn.functional.interpolate(images.float(), size=self.size, mode="bicubic",
                                                 align_corners=False).clamp(0, 1)
        return self.clip.model.encode_image((images - self.mean) / self.std).float()


# eval.features: the FID/KID feature extractor, from the run's CLIP or torchmetrics' Inception.
FEATURES = {
    "clip": ClipImageFeatures,
    "inception": lambda clip: 2048,  # torchmetrics' Inception-v3 pool features
}


def load_images(paths: Sequence) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def image_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """`[N, 3, H, W]` float images in [0, 1], resized to `size` (height, width) if given."""
    if size is not None:
        images = [image.resize((size[1], size[0]), Image.BICUBIC) for image in images]
    arrays = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def kid_subset(n_real: int, n_fake: int, size: int | None = None) -> int:
    """Images per KID subset: `size`, or half of the smaller set (at most 1000, torchmetrics'
    default), so that subsets differ and their spread (kid_std) means something."""
    smaller = min(n_real, n_fake)
    if size is None:
        return max(2, min(1000, smaller // 2))
    if size > smaller:
        raise UserError(f"eval.kid_subset_size={size} exceeds the {smaller} images of the "
                        "smaller set; lower it, or leave it null (half the set)")
    return size


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature: torch.nn.Module | int,
            subset_size: int | None = None, subsets: int = 100, seed: int = 0
            ) -> dict[str, float]:
    """FID and KID (mean and std over `subsets` seeded random subsets) of `fake` against `real`,
    float images in [0, 1]. At small N, FID is biased upwards; KID is unbiased (so it can be
    slightly negative when the two sets are alike), so report both."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} and "
                         f"{len(fake)}")
    subset = kid_subset(len(real), len(fake), subset_size)
    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=True)
    except OSError as error:  # Inception's weights download on first use
        raise ModelUnavailable(f"FID/KID could not get torchmetrics' Inception weights "
                               f"({str(error).splitlines()[0][:200]}); use eval.features=clip"
                               ) from error
    with warnings.catch_warnings():  # KID keeps every feature in memory, as any KID must
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will "
                                "save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(feature=feature, normalize=True, subset_size=subset,
                                      subsets=subsets)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # subsets drawn from torch's global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
