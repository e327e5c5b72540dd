"""Evaluate: fairness, quality and alignment of base and steered images.

Writes `<run>/metrics.json` (every key is defined in docs/metrics.md): the settings its numbers
depend on (model, concept, method, layers, alpha, step_window, direction, units, halves, renorm,
probe_set, sampler, classes, target, seed, labeler, features, kid_subsets, denoiser_calls) and
a `base` and a `steered` section:

    "base":    {fd, fd_soft, kl, deviation, n_images, n_undecided, clip_t, per_prompt, ci},
    "steered": {... the same ..., clip_i, fid, kid, kid_std [, fid_reference, ...], change_ci}

`ci` holds bootstrap 95% intervals over images (`{metric: [low, high]}`), `change_ci` those of
steered minus base (paired: the same resampled seeds on both sides).

The per-image table (`<run>/evaluate/images.parquet`/`.csv`) adds clip_t and clip_i per image;
`<run>/evaluate/distribution.png` charts the class shares per prompt with their FD.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from icm_lab.config.schema import EvalConfig
from icm_lab.core.errors import UserError
from icm_lab.evaluation.metrics import (
    BOOTSTRAP,
    FEATURES,
    bootstrap_fairness,
    clip_score,
    extract,
    fairness_by_prompt,
    fid_kid,
    frechet_distance,
    kid_subset,
    reference_statistics,
)
from icm_lab.io.files import write_json, write_table
from icm_lab.models.clip import Clip, open_image
from icm_lab.report.figures import class_distribution
from icm_lab.stages.registry import RunState, Stage, register
from icm_lab.stages.resources import Resources
from icm_lab.stages.steer import SteerResult
from icm_lab.steering.plans import SteerPlan

log = logging.getLogger(__name__)


def evaluate(res: Resources, cfg: EvalConfig, steered: SteerResult, seed: int,
             denoiser_calls: dict[str, int] | None = None) -> dict:
    concept, plan = res.concept, steered.plan
    table = steered.table.copy()
    if table.empty:
        raise UserError("evaluate got zero images: eval.n_images_per_prompt and the concept's "
                        "eval_prompts must give at least one")
    classes, target = list(concept.classes), concept.target
    with tqdm(total=3, desc="evaluate", unit="step") as bar:  # each step takes seconds
        bar.set_postfix_str("CLIP-T and CLIP-I")
        # Files, not images: every model reads them a batch at a time (memory stays bounded).
        base_paths, steered_paths = steered.image_paths()
        clip_scores(res.clip, table, base_paths, steered_paths)
        bar.update()
        bar.set_postfix_str("FID and KID")
        base = fairness_by_prompt(table, "base_label", "base_p_", classes, target, "base_weight")
        after = fairness_by_prompt(table, "label", "p_", classes, target, "weight")
        base["clip_t"] = float(table["base_clip_t"].mean())
        after |= {"clip_t": float(table["clip_t"].mean()),
                  "clip_i": float(table["clip_i"].mean())}
        after |= quality(res, cfg, base_paths, steered_paths, seed)
        intervals = bootstrap_fairness(table, SIDES, classes, target, seed)
        base["ci"], after["ci"] = intervals["base"], intervals["steered"]
        after["change_ci"] = intervals["change"]
        bar.update()
        bar.set_postfix_str("metrics.json and the chart")
        metrics = {**settings(res, cfg, plan, len(table), seed), "classes": classes,
                   "target": target.tolist(), "denoiser_calls": dict(denoiser_calls or {}),
                   "base": base, "steered": after}
        figure = write_results(res, table, metrics)
        bar.update()
    summary = {f"{side}/{key}": value for side in ("base", "steered")
               for key, value in metrics[side].items() if isinstance(value, int | float)}
    res.tracker.log_metrics(summary)
    res.tracker.log_images({"evaluate/distribution": figure})
    res.tracker.log_table("evaluate/images", table)
    log.info("evaluate: %s", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return metrics


# Each side's label, probability prefix and weight column in the per-image table.
SIDES = {"base": ("base_label", "base_p_", "base_weight"), "steered": ("label", "p_", "weight")}


def clip_scores(clip: Clip, table: pd.DataFrame, base_images: Sequence, steered_images: Sequence
                ) -> None:
    """Adds base_clip_t, clip_t and clip_i per image (PIL images or files) to `table`."""
    base_features = clip.encode_images(base_images)
    steered_features = clip.encode_images(steered_images)
    prompt_features = clip.encode_texts(list(table["prompt"]))
    table["base_clip_t"] = clip_score(base_features, prompt_features).numpy()
    table["clip_t"] = clip_score(steered_features, prompt_features).numpy()
    table["clip_i"] = clip_score(steered_features, base_features).numpy()  # same seed


def settings(res: Resources, cfg: EvalConfig, plan: SteerPlan, n_images: int, seed: int
             ) -> dict[str, Any]:
    """What the numbers of metrics.json depend on; the steering ones are null for a method that
    adds no vector (prompt, none). The rest is in the run's config.yaml."""
    hooked = plan.alpha is not None
    return {
        "model": res.model.name, "concept": res.concept.name, "method": plan.method,
        "layers": plan.layers, "alpha": plan.alpha,
        "step_window": {"first": plan.start, "last": plan.end - 1} if hooked else None,
        "direction": plan.direction, "units": plan.units,
        "halves": plan.halves if hooked else None,
        "renorm": plan.renorm if hooked else None, "probe_set": plan.probe_set,
        "sampler": {key: plan.model[key] for key in SAMPLER},
        "seed": seed, "labeler": res.labeler_description(),
        "features": features_description(res, cfg),
        "kid_subsets": {"size": kid_subset(n_images, n_images, cfg.kid_subset_size),
                        "count": cfg.kid_subsets},
        "bootstrap": {**BOOTSTRAP, "seed": seed,
                      "unit": "images, drawn with replacement within each prompt"},
    }


SAMPLER = ("scheduler", "steps", "guidance", "resolution", "dtype")  # of model=, for images


def features_description(res: Resources, cfg: EvalConfig) -> dict[str, Any]:
    """The FID/KID feature extractor."""
    if cfg.features == "clip":
        return {"name": "clip", "image_tower_of": res.clip_description()}
    return {"name": "inception", "network": "torchmetrics' Inception-v3, 2048 pool features"}


def write_results(res: Resources, table: pd.DataFrame, metrics: dict) -> Path:
    """metrics.json, the per-image table and the distribution chart."""
    out = res.run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "images.parquet")
    write_table(table, out / "images.csv")
    write_json(res.run_dir / "metrics.json", metrics)
    strength = "" if metrics["alpha"] is None else f", alpha {metrics['alpha']:g}"
    return class_distribution(
        table, metrics["classes"], np.asarray(metrics["target"]), out / "distribution.png",
        fd={side: metrics[side] for side in ("base", "steered")},
        title=f"{metrics['model']}, {metrics['concept']}: method {metrics['method']}{strength}"
              f" (labels: {metrics['labeler']['name']})")


def quality(res: Resources, cfg: EvalConfig, base_images: Sequence, steered_images: Sequence,
            seed: int) -> dict:
    """FID/KID of the steered images against the base images, against a reference folder
    (resized to the steered images' size) and FID against reference statistics."""
    feature = FEATURES[cfg.features](res.clip)
    options = {"subset_size": cfg.kid_subset_size, "subsets": cfg.kid_subsets, "seed": seed}
    steered = extract(steered_images, feature)  # once, for every comparison
    scores = fid_kid(base_images, steered, feature, paired=True, **options)
    if cfg.reference_dir:
        paths = image_files(cfg.reference_dir, "eval.reference_dir")
        width, height = open_image(steered_images[0]).size
        against = fid_kid(paths, steered, feature, real_size=(height, width), **options)
        scores |= {f"{key}_reference": value for key, value in against.items()}
    if cfg.reference_stats:
        mu, sigma = reference_statistics(cfg.reference_stats, steered.shape[1])
        scores["fid_reference_stats"] = frechet_distance(mu, sigma, steered)
    return scores


def image_files(folder: str | Path, name: str = "the folder") -> list[Path]:
    if not Path(folder).is_dir():
        raise UserError(f"{name} {str(folder)!r} is not a folder of images")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{name} {str(folder)!r} holds no .png/.jpg images")
    return paths


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# -- in the run's stage graph ----------------------------------------------------------------


def run_evaluate(run: RunState) -> dict[str, Any]:
    return evaluate(run.res, run.parts.sections["eval"], run.results["steer"], run.cfg.seed,
                    run.denoiser_calls)


register(Stage("evaluate", section="eval", result=dict, needs=lambda run: ("steer",),
               run=run_evaluate))
