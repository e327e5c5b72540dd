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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from icm_lab.core.errors import ModelUnavailable, UserError
from icm_lab.io.files import atomic
from icm_lab.labeling.labelers import UNDECIDED
from icm_lab.models.clip import Clip, open_image
from icm_lab.models.loading import like_parameters

# An image set: a [N, 3, H, W] float tensor in [0, 1], or PIL images or image files.
Images = torch.Tensor | Sequence[Image.Image | str | Path]


def fairness(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
             target: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """`weights`: the readings behind each row of `probs` (FairFace: faces), so that soft
    frequencies are the mean over readings; None: every row with a reading counts once."""
    labels = np.asarray(labels)
    n_undecided = int((labels == UNDECIDED).sum())
    n_decided = len(labels) - n_undecided
    if len(labels) == 0:
        raise ValueError("fairness needs at least one image, got zero")
    hard = np.array([(labels == k).sum() for k in classes], dtype=float)
    hard = hard / n_decided if n_decided else np.full(len(classes), np.nan)
    soft = soft_frequencies(np.asarray(probs, dtype=float), weights)
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


def soft_frequencies(probs: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The weighted mean probability per class over the rows with a reading (NaN rows have
    none); NaN when no row has one."""
    has_reading = ~np.isnan(probs).all(axis=1)
    w = has_reading.astype(float) if weights is None else np.where(has_reading, weights, 0.0)
    total = w.sum()
    if total == 0:
        return np.full(probs.shape[1], np.nan)
    return (np.nan_to_num(probs) * w[:, None]).sum(axis=0) / total


def fairness_by_prompt(table: pd.DataFrame, label: str, prob_prefix: str,
                       classes: Sequence[str], target: np.ndarray,
                       weight: str | None = None) -> dict:
    """Per prompt, then averaged over prompts (NaN-aware; the paper's way), and FD pooled over
    all images (`fd_pooled`, `fd_soft_pooled`): one prompt skewed one way and another the
    other way cancel when pooled, not when averaged."""
    columns = [f"{prob_prefix}{k}" for k in classes]

    def weights(rows: pd.DataFrame) -> np.ndarray | None:
        return rows[weight].to_numpy(float) if weight in rows else None

    per_prompt = {
        prompt: fairness(rows[label], rows[columns].to_numpy(), classes, target, weights(rows))
        for prompt, rows in table.groupby("prompt", sort=False)
    }
    frame = pd.DataFrame(per_prompt).T
    averaged = {key: float(np.nanmean(frame[key].astype(float)))
                for key in ("fd", "fd_soft", "kl", "deviation")}
    pooled = fairness(table[label], table[columns].to_numpy(), classes, target, weights(table))
    return {**averaged, "fd_pooled": pooled["fd"], "fd_soft_pooled": pooled["fd_soft"],
            "n_images": len(table), "n_undecided": int(frame["n_undecided"].sum()),
            "per_prompt": per_prompt}


BOOTSTRAP = {"resamples": 1000, "level": 0.95}  # percentile intervals (docs/metrics.md)
# FD-type metrics get intervals for the true distance (see `bootstrap_fairness`); KL and
# deviation get none: their plug-in estimates are biased upward near zero just the same, and no
# correction as simple exists.
CI_METRICS = ("fd", "fd_pooled", "fd_soft", "clip_t", "clip_i")


def bootstrap_fairness(table: pd.DataFrame, sides: dict[str, tuple[str, str, str | None]],
                       classes: Sequence[str], target: np.ndarray, seed: int,
                       resamples: int = BOOTSTRAP["resamples"],
                       level: float = BOOTSTRAP["level"]) -> dict[str, dict]:
    """Percentile bootstrap 95% intervals over images. Each resample draws every prompt's images
    with replacement (prompts stay as they are, as FD averages them), and one draw serves every
    side (base and steered images share seeds, so their difference is paired). `sides`: name
    -> (label column, probability prefix, weight column).

    FD is a distance, so sampling noise only adds to it: E[FD^2] = FD_true^2 + sum_k Var(f_k),
    and with 32 images a prompt a perfectly fair model shows FD ~0.1. A percentile interval of
    FD itself sits above the truth (often above the estimate). So `fd`, `fd_pooled` and
    `fd_soft` get intervals for the true distance: the corrected estimate T =
    sqrt(max(0, FD^2 - unbiased sum_k Var(f_k))) (per prompt, then averaged; in `corrected`),
    and a basic bootstrap around it, since in the resampled world the truth is the plug-in FD:
    [T - (q_hi - FD), T - (q_lo - FD)] with q the percentiles of the resampled T, clipped at 0.
    They can lie below the printed FD, the paper's plug-in definition. `clip_t`, `clip_i` and
    the class shares (`per_prompt`) are plain percentile intervals. Per side `{metric: [low,
    high]}` and `corrected`, and `change` (steered - base, paired) when both sides are given."""
    rng = np.random.default_rng(seed)
    groups = dict(list(table.groupby("prompt", sort=False)))
    draws = {p: rng.integers(0, len(rows), (resamples, len(rows))) for p, rows in groups.items()}
    whole = {p: np.arange(len(rows))[None] for p, rows in groups.items()}  # the sample itself
    values = {name: _resampled(table, draws, *columns, classes, target)
              for name, columns in sides.items()}
    observed = {name: _resampled(table, whole, *columns, classes, target)
                for name, columns in sides.items()}
    tails = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(name: str, key: str) -> list[float]:
        if f"{key}_sq" not in values[name]:
            return np.nanpercentile(values[name][key], tails).tolist()
        # The hull of two intervals for the true distance, each failing in another regime
        # (simulated coverage in docs/metrics.md): the percentile interval of the resampled
        # corrected distance, which misses a true 0 when several prompts are averaged, and
        # the basic interval on the squared scale, which undercovers away from 0.
        corrected = np.nanpercentile(values[name][f"{key}_true"], tails)
        basic = _distance_interval(values[name], observed[name], key, tails)
        return [float(min(corrected[0], basic[0])), float(max(corrected[1], basic[1]))]

    def change(key: str) -> list[float]:
        """Percentile interval of the paired difference (steered - base) of the plain metric,
        or for a distance of the corrected one, shifted by the resampled world's bias."""
        after, before = values["steered"], values["base"]
        if f"{key}_true" not in after:
            return np.nanpercentile(after[key] - before[key], tails).tolist()
        delta = after[f"{key}_true"] - before[f"{key}_true"]
        truth = observed["steered"][key][0] - observed["base"][key][0]  # the plug-in world's
        estimate = observed["steered"][f"{key}_true"][0] - observed["base"][f"{key}_true"][0]
        q = np.nanpercentile(delta, tails) - truth
        return [float(estimate - q[1]), float(estimate - q[0])]

    out = {}
    for name, v in values.items():
        out[name] = {key: interval(name, key) for key in CI_METRICS if key in v}
        out[name]["corrected"] = {key: float(observed[name][f"{key}_true"][0])
                                  for key in ("fd", "fd_pooled", "fd_soft")}
        out[name]["per_prompt"] = {prompt: np.nanpercentile(shares, tails, axis=0).T.tolist()
                                   for prompt, shares in v["shares"].items()}
    if {"base", "steered"} <= set(values):
        out["change"] = {key: change(key) for key in CI_METRICS
                         if key in values["steered"] and key in values["base"]}
    return out


def _distance_interval(resampled: dict, observed: dict, key: str, tails: list[float]
                       ) -> list[float]:
    """A basic bootstrap interval per prompt on the squared scale, where the corrected estimate
    U = FD^2 - sum Var is unbiased and smooth: in the resampled world the truth is the plug-in
    FD^2, so U* - FD^2 stands for U - truth, and [U - (q_hi - FD^2), U - (q_lo - FD^2)] bounds
    the true square. Each bound's sqrt(max(0, .)), averaged over prompts like FD itself."""
    q = np.nanpercentile(resampled[f"{key}_sq"], tails, axis=1)  # [2, P]
    plug, estimate = observed[f"{key}_plug_sq"][:, 0], observed[f"{key}_sq"][:, 0]
    low, high = estimate - (q[1] - plug), estimate - (q[0] - plug)
    distance = lambda square: float(np.nanmean(np.sqrt(np.maximum(0, square))))  # noqa: E731
    return [distance(low), distance(high)]


def _resampled(table: pd.DataFrame, draws: dict[str, np.ndarray], label: str, prefix: str,
               weight: str | None, classes: Sequence[str], target: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Every resample's metrics, `[resamples]` each: the plug-in ones as `fairness_by_prompt`
    computes them (per prompt, averaged), `<fd key>_true` the noise-corrected distances, the
    per-image means of `clip_t`/`clip_i` where the table has them for this side (prefix
    `base_p_` reads `base_clip_t`), and each prompt's class shares `[resamples, K]`."""
    per_prompt, shares, pooled = [], {}, {"counts": 0.0, "soft": 0.0, "mass": 0.0, "var": 0.0}
    side = prefix.removesuffix("p_")
    clip = {c: [] for c in ("clip_t", "clip_i") if f"{side}{c}" in table}
    for prompt, rows in table.groupby("prompt", sort=False):
        idx = draws[prompt]
        onehot = np.stack([(rows[label] == k).to_numpy(float) for k in classes], axis=1)
        probs = rows[[f"{prefix}{k}" for k in classes]].to_numpy(float)
        has = ~np.isnan(probs).all(axis=1)
        w = (rows[weight].to_numpy(float) if weight in rows else has.astype(float)) * has
        counts = onehot[idx].sum(axis=1)  # [B, K]
        wp = np.nan_to_num(probs) * w[:, None]
        sums = {"soft": wp[idx].sum(axis=1), "mass": w[idx].sum(axis=1),
                "w2p": (wp * w[:, None])[idx].sum(axis=1),
                "w2p2": (wp ** 2)[idx].sum(axis=1), "w2": (w ** 2)[idx].sum(axis=1),
                "rows": (w > 0)[idx].sum(axis=1)}
        metrics = _fairness_arrays(counts, sums["soft"], sums["mass"], target)
        metrics |= _true_distances(metrics, counts, sums, target)
        per_prompt.append(metrics)
        shares[prompt] = metrics["f"]
        decided = counts.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):  # Var of the pooled count
            var = (decided[:, None] ** 2 * metrics["f"] * (1 - metrics["f"])).sum(axis=1) / (
                decided - 1)
        pooled = {"counts": pooled["counts"] + counts, "soft": pooled["soft"] + sums["soft"],
                  "mass": pooled["mass"] + sums["mass"], "var": pooled["var"] + var}
        for c in clip:
            clip[c].append(rows[f"{side}{c}"].to_numpy(float)[idx])
    with np.errstate(invalid="ignore"):
        result = {key: np.nanmean([m[key] for m in per_prompt], axis=0)
                  for key in ("fd", "fd_soft", "kl", "deviation", "fd_true", "fd_soft_true")}
        whole = _fairness_arrays(pooled["counts"], pooled["soft"], pooled["mass"], target)
        n = pooled["counts"].sum(axis=1)
        result["fd_pooled"] = whole["fd"]
        square = whole["fd"] ** 2 - pooled["var"] / n**2
        result["fd_pooled_true"] = np.sqrt(np.maximum(0, square))
    # Per prompt [P, resamples]: the unbiased squares and the plug-in squares, for intervals.
    for key in ("fd", "fd_soft"):
        result[f"{key}_sq"] = np.stack([m[f"{key}_sq"] for m in per_prompt])
        result[f"{key}_plug_sq"] = np.stack([m[key] ** 2 for m in per_prompt])
    result["fd_pooled_sq"], result["fd_pooled_plug_sq"] = square[None], whole["fd"][None] ** 2
    result |= {c: np.concatenate(v, axis=1).mean(axis=1) for c, v in clip.items()}
    return {**result, "shares": shares}


def _true_distances(metrics: dict[str, np.ndarray], counts: np.ndarray,
                    sums: dict[str, np.ndarray], target: np.ndarray) -> dict[str, np.ndarray]:
    """Unbiased estimates of the squared true distances, FD^2 - sum_k Var (`<key>_sq`, may be
    negative), and the distances sqrt(max(0, .)) (`<key>_true`). Var(f_k) is estimated by
    f_k (1 - f_k) / (n - 1); Var(p_k) by the weighted mean's sum_i w_i^2 (p_ik - p_k)^2 /
    (sum w)^2 * m / (m - 1) over the m images with a reading."""
    f, n = metrics["f"], counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hard = (f * (1 - f)).sum(axis=1) / (n - 1)
        p = sums["soft"] / sums["mass"][:, None]
        spread = sums["w2p2"] - 2 * p * sums["w2p"] + p ** 2 * sums["w2"][:, None]
        m = sums["rows"]
        soft = (spread.sum(axis=1) / sums["mass"] ** 2) * m / (m - 1)
    squares = {"fd_sq": metrics["fd"] ** 2 - hard, "fd_soft_sq": metrics["fd_soft"] ** 2 - soft}
    return {**squares, "fd_true": np.sqrt(np.maximum(0, squares["fd_sq"])),
            "fd_soft_true": np.sqrt(np.maximum(0, squares["fd_soft_sq"]))}


def _fairness_arrays(counts: np.ndarray, soft: np.ndarray, mass: np.ndarray,
                     target: np.ndarray) -> dict[str, np.ndarray]:
    """`fairness` on `[B, K]` class counts and probability sums: FD, FD_soft, KL, deviation
    and the shares f per resample (NaN where a resample has no decided image)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        f = counts / counts.sum(axis=1, keepdims=True)
        p = soft / mass[:, None]
        kl = np.where(f > 0, f * np.log(f / target), 0.0).sum(axis=1)
    kl[np.isnan(f).any(axis=1)] = np.nan
    return {"fd": np.linalg.norm(f - target, axis=1), "fd_soft": np.linalg.norm(p - target, axis=1),
            "kl": kl, "deviation": np.abs(f - target).max(axis=1) / (1 - target).max(), "f": f}


def clip_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between matching rows of unit feature matrices."""
    return ((a * b).sum(dim=-1) + 1) / 2


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image tower as a FID/KID feature extractor: one batch of float images in [0, 1],
    `[N, 3, H, W]`, resized and normalised as CLIP expects, to `[N, embed_dim]` float32 CPU
    features (`Clip.encode_pixels` moves it to the model and back). `extract` feeds it
    `batch_size` images at a time."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip, self.batch_size = clip, clip.batch_size
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
        return self.clip.encode_pixels((images - self.mean) / self.std)


INCEPTION_SIZE = 299


def clean_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's resize (Parmar et al. 2022, `make_resizer("PIL", False, "bicubic")`): each
    channel of the 0-255 image resized as a float PIL image with bicubic filtering, which
    antialiases; then rounded to 8 bits, the only input torchmetrics' network takes (at most
    0.5/255 from clean-fid, which keeps floats)."""
    pixels = (images.float().clamp(0, 1) * 255).numpy()
    out = np.stack([[np.asarray(Image.fromarray(channel, mode="F").resize(
        (size, size), Image.BICUBIC)) for channel in image] for image in pixels])
    return torch.from_numpy(out).round().clamp(0, 255).byte()


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool features of one batch of float images in [0, 1], resized to 299 px the
    way clean-fid does and fed to `net` as the 8-bit images torchmetrics' network expects, on
    its device; float32 CPU features.

    FID is torchmetrics' (the FID Inception weights, torch-fidelity's port, which clean-fid
    also uses) with clean-fid's resize: torchmetrics' network would otherwise resize 512 or 1024
    px images itself with TF1-style bilinear interpolation, which aliases and shifts FID
    (clean-fid's paper); at 299 px that resize is the identity. Not the clean-fid package: it
    downloads its own copy of the weights at run time and reads images from folders only."""

    def __init__(self, net: torch.nn.Module, batch_size: int, num_features: int = 2048):
        super().__init__()
        self.net, self.batch_size, self.num_features = net, batch_size, num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(like_parameters(clean_resize(images), self.net)).float().cpu()


def inception_features(clip: Clip) -> InceptionFeatures:
    """torchmetrics' Inception-v3 (2048 pool features) on the run's device (the CLIP's)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        net = FrechetInceptionDistance(feature=2048).inception
    except OSError as error:  # Inception's weights download on first use
        raise ModelUnavailable(f"FID/KID could not get torchmetrics' Inception weights "
                               f"({str(error).splitlines()[0][:200]}); use "
                               "eval.features=clip") from error
    return InceptionFeatures(net.to(clip.device), clip.batch_size)


# eval.features: the FID/KID feature extractor, given the run's CLIP (device and batch size).
FEATURES = {"clip": ClipImageFeatures, "inception": inception_features}


def load_images(images: Sequence) -> list[Image.Image]:
    """RGB images from PIL images or files."""
    return [open_image(image) for image in images]


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


def extract(images: Images, feature: torch.nn.Module, size: tuple[int, int] | None = None
            ) -> torch.Tensor:
    """`[N, d]` float64 CPU features of images: a `[N, 3, H, W]` float tensor in [0, 1], or PIL
    images or files, decoded (and resized to `size`, height and width) `feature.batch_size` at
    a time, so an image set of any size is never held in memory at once."""
    batch = feature.batch_size
    chunks = (images[i:i + batch] for i in range(0, len(images), batch))
    with torch.no_grad():
        return torch.cat([feature(chunk if isinstance(chunk, torch.Tensor) else image_tensor(
            load_images(chunk), size)).double() for chunk in chunks])


def kid(real: torch.Tensor, fake: torch.Tensor, size: int, subsets: int, paired: bool,
        seed: int) -> tuple[float, float]:
    """KID of feature sets: the mean and standard deviation over `subsets` random subsets of
    `size` rows of each (torchmetrics' unbiased polynomial-kernel MMD per subset). `paired`:
    row i of both sets comes from one seed (steered against base images), so each draw takes
    the two subsets from disjoint rows; the same images on both sides would pull the estimate
    below zero."""
    from torchmetrics.image.kid import poly_mmd

    paired = paired and len(real) == len(fake) and 2 * size <= len(real)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        if paired:
            rows = torch.randperm(len(real), generator=generator)
            chosen = real[rows[:size]], fake[rows[size:2 * size]]
        else:
            chosen = (real[torch.randperm(len(real), generator=generator)[:size]],
                      fake[torch.randperm(len(fake), generator=generator)[:size]])
        values.append(poly_mmd(*chosen))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=False))


def fid_kid(real: Images, fake: Images | torch.Tensor, feature: torch.nn.Module,
            subset_size: int | None = None, subsets: int = 100, seed: int = 0,
            paired: bool = False, real_size: tuple[int, int] | None = None) -> dict[str, float]:
    """FID and KID (mean and std over `subsets` seeded random subsets) of `fake` against `real`,
    images as `extract` reads them (`real_size`: resize the real ones), each image's features
    computed once; `fake` may be its features already (`[N, d]`, from `extract`). At small N,
    FID is biased upwards; KID is unbiased (so it can be slightly negative when the two sets
    are alike), so report both. `paired`: image i of both sets shares a seed (see `kid`)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} and "
                         f"{len(fake)}")
    size = kid_subset(len(real), len(fake), subset_size)
    real = extract(real, feature, real_size)
    fake = fake if _are_features(fake) else extract(fake, feature)
    kid_mean, kid_std = kid(real, fake, size, subsets, paired, seed)
    return {"fid": frechet_distance(*gaussian(real), fake), "kid": kid_mean, "kid_std": kid_std}


def _are_features(images: Images | torch.Tensor) -> bool:
    return isinstance(images, torch.Tensor) and images.dim() == 2


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (unbiased, as torchmetrics and clean-fid) of `[N, d]` features."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def frechet_distance(mu: torch.Tensor, sigma: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of `[N, d]` features against a Gaussian (mu, sigma): torchmetrics' formula."""
    from torchmetrics.image.fid import _compute_fid

    fake_mu, fake_sigma = gaussian(fake)
    return float(_compute_fid(mu.double(), sigma.double(), fake_mu, fake_sigma))


def reference_statistics(path: str | Path, num_features: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`mu` and `sigma` from an .npz (clean-fid's and pytorch-fid's format, e.g. clean-fid's
    FFHQ statistics), checked against the feature width; no pickle is loaded."""
    try:
        with np.load(path, allow_pickle=False) as stats:
            mu, sigma = stats["mu"], stats["sigma"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"eval.reference_stats={str(path)!r} is not an .npz with arrays `mu` "
                        f"and `sigma` ({type(error).__name__}: {error})") from None
    d = mu.shape[0]
    if mu.ndim != 1 or sigma.shape != (d, d) or (num_features and d != num_features):
        raise UserError(f"eval.reference_stats={str(path)!r} holds mu {mu.shape} and sigma "
                        f"{sigma.shape}; the features (eval.features) are {num_features} wide")
    return torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()


def save_reference_statistics(images: Images, feature: torch.nn.Module, path: Path) -> Path:
    """Write the `mu`/`sigma` .npz of an image folder's features, for `eval.reference_stats`."""
    mu, sigma = gaussian(extract(images, feature))
    with atomic(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, mu=mu.numpy(), sigma=sigma.numpy())
    return path
