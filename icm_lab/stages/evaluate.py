"""Evaluate: fairness, quality and alignment of base and steered images.

Writes `<run>/metrics.json`:

    {"model", "concept", "method", "layers", "alpha", "steps", "direction", "classes", "target",
     "seed", "classifier", "denoiser_calls",
     "base":    {fd, fd_soft, kl, deviation, n_images, n_undecided, clip_t, per_prompt},
     "steered": {... the same ..., clip_i, fid, kid, kid_std}}

alpha, steps ([first, last + 1]) and direction are null for methods that add no vector.
denoiser_calls counts, per upstream stage, the denoiser calls this run computed (0 for a stage
whose artefacts were reused; a batch with classifier-free guidance is one call).
fd/fd_soft/kl/deviation are per prompt, then averaged over prompts (per-prompt values under
`per_prompt`). fid/kid compare the steered images with the unsteered images of the same
prompts; with `eval.reference_dir`, `fid_reference`/`kid_reference` compare with that folder.
The per-image table (`<run>/evaluate/images.parquet`/`.csv`) adds clip_t and clip_i per image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from icm_lab.artefacts import write_json_atomic
from icm_lab.errors import UserError
from icm_lab.figures import class_distribution
from icm_lab.metrics import (
    FEATURES,
    clip_score,
    fairness_by_prompt,
    fid_kid,
    image_tensor,
    load_images,
)
from icm_lab.resources import Resources
from icm_lab.schema import EvalConfig
from icm_lab.stages.steer import SteerResult

log = logging.getLogger(__name__)


def evaluate(res: Resources, cfg: EvalConfig, steered: SteerResult, seed: int,
             denoiser_calls: dict[str, int] | None = None) -> dict:
    concept, plan = res.concept, steered.plan
    table = steered.table.copy()
    if table.empty:
        raise UserError("evaluate got zero images: eval.n_images_per_prompt and the concept's "
                        "eval_prompts must give at least one")
    classes, target = list(concept.classes), concept.target
    base_paths, steered_paths = steered.image_paths()
    base_images, steered_images = load_images(base_paths), load_images(steered_paths)

    clip = res.clip
    base_features = clip.encode_images(base_images)
    steered_features = clip.encode_images(steered_images)
    prompt_features = clip.encode_texts(list(table["prompt"]))
    table["base_clip_t"] = clip_score(base_features, prompt_features).cpu().numpy()
    table["clip_t"] = clip_score(steered_features, prompt_features).cpu().numpy()
    table["clip_i"] = clip_score(steered_features, base_features).cpu().numpy()  # same seed

    base = fairness_by_prompt(table, "base_label", "base_p_", classes, target)
    after = fairness_by_prompt(table, "label", "p_", classes, target)
    base["clip_t"] = float(table["base_clip_t"].mean())
    after |= {"clip_t": float(table["clip_t"].mean()), "clip_i": float(table["clip_i"].mean())}
    after |= quality(res, cfg, base_images, steered_images)

    metrics = {
        "model": res.model.name, "concept": concept.name, "method": plan.method,
        "layers": plan.layers, "alpha": plan.alpha,
        "steps": None if plan.start is None else [plan.start, plan.end],
        "direction": plan.direction, "classes": classes, "target": target.tolist(),
        "seed": seed, "classifier": res.labeler_description(),
        "denoiser_calls": dict(denoiser_calls or {}), "base": base, "steered": after,
    }
    out = res.run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "images.parquet", index=False)
    table.to_csv(out / "images.csv", index=False)
    write_json_atomic(res.run_dir / "metrics.json", metrics)
    strength = "" if plan.alpha is None else f", alpha {plan.alpha:g}"
    figure = class_distribution(table, classes, target, out / "distribution.png",
                                title=f"{concept.name}: {plan.method}{strength}")
    summary = {f"{side}/{key}": value for side in ("base", "steered")
               for key, value in metrics[side].items() if isinstance(value, int | float)}
    res.tracker.log_metrics(summary)
    res.tracker.log_images({"evaluate/distribution": figure})
    res.tracker.log_table("evaluate/images", table)
    log.info("evaluate: %s", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return metrics


def quality(res: Resources, cfg: EvalConfig, base_images: list, steered_images: list) -> dict:
    """FID/KID of the steered images against the base images, and against a reference folder."""
    feature = FEATURES[cfg.features](res.clip)
    steered = image_tensor(steered_images)
    scores = fid_kid(image_tensor(base_images), steered, feature)
    if cfg.reference_dir:
        paths = sorted(p for p in Path(cfg.reference_dir).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            raise UserError(f"eval.reference_dir={cfg.reference_dir} holds no .png/.jpg images")
        size = steered.shape[-2:]
        against = fid_kid(image_tensor(load_images(paths), size=tuple(size)), steered, feature)
        scores |= {f"{key}_reference": value for key, value in against.items()}
    return scores
