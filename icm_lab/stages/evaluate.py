"""Evaluate: fairness, quality and alignment of base and steered images.

Writes `<run>/metrics.json`:

    {"model", "concept", "method", "layers", "alpha", "classes", "target", "classifier",
     "base":    {fd, fd_soft, kl, deviation, n_images, n_undecided, clip_t, per_prompt},
     "steered": {... the same ..., clip_i, fid, kid, kid_std}}

fd/fd_soft/kl/deviation are per prompt, then averaged over prompts (per-prompt values under
`per_prompt`). fid/kid compare the steered images with the unsteered images of the same
prompts; with `eval.reference_dir`, `fid_reference`/`kid_reference` compare with that folder.
The per-image table (`<run>/evaluate/images.parquet`/`.csv`) adds clip_t and clip_i per image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from icm_lab.artefacts import write_json_atomic
from icm_lab.figures import class_distribution
from icm_lab.metrics import (
    ClipImageFeatures,
    clip_score,
    fairness_by_prompt,
    fid_kid,
    image_tensor,
    load_images,
)
from icm_lab.runner import RunContext
from icm_lab.stages.steer import SteerResult

log = logging.getLogger(__name__)
FEATURES = ("clip", "inception")


def evaluate(ctx: RunContext) -> dict:
    cfg, concept = ctx.cfg, ctx.concept
    result: SteerResult = ctx.stage("steer")
    table = result.table.copy()
    if table.empty:
        raise ValueError("evaluate got zero images: eval.n_images_per_prompt and the concept's "
                         "eval_prompts must give at least one")
    classes, target = list(concept.classes), concept.target
    base_paths, steered_paths = result.image_paths()
    base_images, steered_images = load_images(base_paths), load_images(steered_paths)

    base_features = ctx.clip.encode_images(base_images)
    steered_features = ctx.clip.encode_images(steered_images)
    prompt_features = ctx.clip.encode_texts(list(table["prompt"]))
    table["base_clip_t"] = clip_score(base_features, prompt_features).cpu().numpy()
    table["clip_t"] = clip_score(steered_features, prompt_features).cpu().numpy()
    table["clip_i"] = clip_score(steered_features, base_features).cpu().numpy()  # same seed

    base = fairness_by_prompt(table, "base_label", "base_p_", classes, target)
    steered = fairness_by_prompt(table, "label", "p_", classes, target)
    base["clip_t"] = float(table["base_clip_t"].mean())
    steered |= {"clip_t": float(table["clip_t"].mean()), "clip_i": float(table["clip_i"].mean())}
    steered |= quality(ctx, base_images, steered_images)

    metrics = {
        "model": cfg.model.name, "concept": cfg.concept.name, "method": cfg.method,
        "layers": result.layers, "alpha": float(cfg.steer.alpha), "classes": classes,
        "target": target.tolist(), "seed": cfg.seed,
        "classifier": {**OmegaConf.to_container(cfg.labeler, resolve=True),
                       "clip": cfg.clip.model, "pretrained": cfg.clip.pretrained,
                       "texts": {k: list(v) for k, v in concept.classifier_texts.items()}},
        "base": base, "steered": steered,
    }
    out = ctx.run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "images.parquet", index=False)
    table.to_csv(out / "images.csv", index=False)
    write_json_atomic(ctx.run_dir / "metrics.json", metrics)
    figure = class_distribution(table, classes, target, out / "distribution.png",
                                title=f"{cfg.concept.name}: {cfg.method}, alpha {cfg.steer.alpha}")
    summary = {f"{side}/{key}": value for side in ("base", "steered")
               for key, value in metrics[side].items() if isinstance(value, int | float)}
    ctx.tracker.log_metrics(summary)
    ctx.tracker.log_images({"evaluate/distribution": figure})
    ctx.tracker.log_table("evaluate/images", table)
    log.info("evaluate: %s", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return metrics


def quality(ctx: RunContext, base_images: list, steered_images: list) -> dict:
    """FID/KID of the steered images against the base images, and against a reference folder."""
    feature_name = ctx.cfg.eval.features
    if feature_name not in FEATURES:
        raise ValueError(f"unknown eval.features {feature_name!r}; valid: {list(FEATURES)}")
    feature = ClipImageFeatures(ctx.clip) if feature_name == "clip" else 2048
    steered = image_tensor(steered_images)
    scores = fid_kid(image_tensor(base_images), steered, feature)
    reference = ctx.cfg.eval.get("reference_dir")
    if reference:
        paths = sorted(p for p in Path(reference).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            raise ValueError(f"eval.reference_dir {reference} holds no .png/.jpg images")
        size = steered.shape[-2:]
        against = fid_kid(image_tensor(load_images(paths), size=tuple(size)), steered, feature)
        scores |= {f"{key}_reference": value for key, value in against.items()}
    return scores
