"""Steer: generate the evaluation prompts twice from the same seeds, unsteered (base) and
steered, and label both.

Base images depend only on the model, the concept's evaluation prompts and the seeds, so they
are a content-addressed artefact that every steering run (an alpha sweep, a method comparison)
reuses. Steered images, the per-image table and before/after grids go to the run directory.

    <run>/steer/images/<index>.png    steered images (same index and seed as the base image)
    <run>/steer/images.parquet/.csv   index, prompt, seed, target, steered, base_label, label, ...
    <run>/steer/grids/prompt_<i>.png  before/after grid per prompt
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from icm_lab.artefacts import Provenance, fingerprint
from icm_lab.figures import before_after_grid
from icm_lab.generation import generate_all
from icm_lab.labeler import UNDECIDED
from icm_lab.probeset import ProbeSet
from icm_lab.runner import RunContext
from icm_lab.selection import select_layers, step_window
from icm_lab.stages.collect import labelled_table, sample_seed, save_images
from icm_lab.steering import (
    LAYER_METHODS,
    UNTOUCHED,
    SteerSettings,
    assign_targets,
    interventions,
    steered_layers,
)

log = logging.getLogger(__name__)


@dataclass
class SteerResult:
    table: pd.DataFrame  # one row per sample: base and steered label side by side
    base_root: Path  # where base image paths are relative to
    steered_root: Path  # where steered image paths are relative to
    layers: list[str]

    def image_paths(self, rows: pd.DataFrame | None = None) -> tuple[list[Path], list[Path]]:
        """Absolute paths of the base and steered image of each row (method=none: both base)."""
        rows = self.table if rows is None else rows
        roots = {"base": self.base_root, "steer": self.steered_root}
        return ([self.base_root / p for p in rows["base_image"]],
                [roots[root] / p for root, p in zip(rows["image_root"], rows["image"],
                                                    strict=True)])


def eval_plan(prompts: tuple[str, ...], per_prompt: int, seed: int) -> pd.DataFrame:
    """Every evaluation prompt `per_prompt` times, each sample with its own seed."""
    if not isinstance(per_prompt, int) or per_prompt <= 0:
        raise ValueError(f"eval.n_images_per_prompt must be a positive integer, got {per_prompt}")
    prompt_id = np.repeat(np.arange(len(prompts)), per_prompt)
    index = np.arange(len(prompt_id))
    return pd.DataFrame({
        "index": index, "prompt_id": prompt_id, "prompt": [prompts[i] for i in prompt_id],
        # A seed stream apart from collection's, so evaluation never reuses a probe's image.
        "seed": [sample_seed(seed + 1_000_003, i) for i in index],
    })


def base_images(ctx: RunContext, plan: pd.DataFrame) -> tuple[pd.DataFrame, Path]:
    """The unsteered images of the plan, labelled; generated once per model/concept/seeds."""
    cfg = ctx.cfg
    provenance = Provenance("base", cfg.model.name, cfg.concept.name, fingerprint(
        model={k: v for k, v in cfg.model.items() if k != "device"},
        prompts=list(plan["prompt"]), seeds=list(plan["seed"]), clip=cfg.clip.model,
        clip_pretrained=cfg.clip.pretrained, labeler=cfg.labeler,
        classes=list(ctx.concept.classes), texts=ctx.concept.classifier_texts,
    ))
    with ctx.artefact(provenance) as root:
        table_path = root / "images.parquet"
        if table_path.exists():
            log.info("steer: reusing the base images at %s", root)
            return pd.read_parquet(table_path), root
        images = generate_all(ctx, list(plan["prompt"]), list(plan["seed"]), desc="base images")
        paths = save_images(images, plan["index"], root / "images", root)
        table = labelled_table(plan, ctx.labeler(images), paths)
        table.to_parquet(root / ".images.parquet.tmp", index=False)
        (root / ".images.parquet.tmp").replace(table_path)  # atomic: complete or absent
        return table, root


def steer(ctx: RunContext) -> SteerResult:
    cfg, concept = ctx.cfg, ctx.concept
    settings = SteerSettings(method=cfg.method, alpha=cfg.steer.alpha,
                             window=step_window(cfg.steer.start, cfg.steer.end, cfg.model.steps),
                             halves=cfg.steer.halves, renorm=cfg.steer.renorm, seed=cfg.seed,
                             direction=cfg.steer.direction)
    plan = eval_plan(concept.eval_prompts, cfg.eval.n_images_per_prompt, cfg.seed)
    # random needs probes too: their scores rank layers for layers=auto.
    probes = load_probes(ctx) if cfg.method in LAYER_METHODS else None
    base, base_root = base_images(ctx, plan)
    targets = plan_targets(ctx, plan, base)

    layers = []
    if probes is not None:
        chosen = select_layers(cfg.layers, ctx.registry, probes.scores, settings.window)
        layers = steered_layers(cfg.method, chosen, ctx.registry)
    log.info("steer: method %s, alpha %s, steps %d-%d, layers %s", cfg.method, settings.alpha,
             settings.window.start, settings.window.stop - 1, [layer.name for layer in layers])

    out = ctx.run_dir / "steer"
    out.mkdir(parents=True, exist_ok=True)
    prompts = steered_prompts(plan, targets, concept.class_words, concept.classes, cfg.method)
    if cfg.method == "none":
        images = None
    else:
        edits = interventions(settings, layers, probes, targets, cfg.model.steps,
                              len(concept.classes))
        images = generate_all(ctx, prompts, list(plan["seed"]), edits, desc=f"steer ({cfg.method})")
    table = result_table(ctx, plan, base, targets, images, out)
    table.to_parquet(out / "images.parquet", index=False)
    table.to_csv(out / "images.csv", index=False)
    result = SteerResult(table, base_root, out, [layer.name for layer in layers])
    grids = draw_grids(result)
    ctx.tracker.log_images({f"steer/grid_{i}": path for i, path in enumerate(grids)})
    ctx.tracker.log_table("steer/images", table)
    return result


def load_probes(ctx: RunContext) -> ProbeSet:
    """This run's probes, or those at `steer.probes` (refused if from another model/concept)."""
    path = ctx.cfg.steer.get("probes")
    if not path:
        return ctx.stage("localize")
    probes = ProbeSet(Path(path))
    found = probes.meta["provenance"]
    for key, expected in (("model", ctx.cfg.model.name), ("concept", ctx.cfg.concept.name)):
        if found[key] != expected:
            raise ValueError(f"the probes at {path} were made for {key} {found[key]!r}, but this "
                             f"run steers {key} {expected!r}; localize with this {key} first")
    return probes


def plan_targets(ctx: RunContext, plan: pd.DataFrame, base: pd.DataFrame) -> np.ndarray:
    """Exact target counts within each prompt (see steering.assign_targets)."""
    concept, policy = ctx.concept, ctx.cfg.steer.policy
    classes = list(concept.classes)
    base_class = np.array([classes.index(x) if x != UNDECIDED else -1 for x in base["label"]])
    targets = np.full(len(plan), UNTOUCHED)
    for prompt_id, rows in plan.groupby("prompt_id").groups.items():
        rows = np.asarray(rows)
        targets[rows] = assign_targets(len(rows), concept.target, ctx.cfg.seed + int(prompt_id),
                                       policy, base_class[rows])
    return targets


def steered_prompts(plan: pd.DataFrame, targets: np.ndarray, words: dict, classes: tuple,
                    method: str) -> list[str]:
    """The prompts to generate from: unchanged, except that the `prompt` baseline appends the
    target class's word to the prompts of steered samples."""
    prompts = list(plan["prompt"])
    if method != "prompt":
        return prompts
    return [p if t == UNTOUCHED else f"{p}, {words[classes[t]][0]}"
            for p, t in zip(prompts, targets, strict=True)]


def result_table(ctx: RunContext, plan: pd.DataFrame, base: pd.DataFrame, targets: np.ndarray,
                 images: list | None, out: Path) -> pd.DataFrame:
    classes = list(ctx.concept.classes)
    table = plan.assign(
        target=[classes[t] if t != UNTOUCHED else "" for t in targets],
        steered=(targets != UNTOUCHED) & (ctx.cfg.method != "none"),
        base_label=base["label"].to_numpy(), base_image=base["image"].to_numpy(),
    )
    for name in classes:
        table[f"base_p_{name}"] = base[f"p_{name}"].to_numpy()
    if images is None:  # method=none: the steered images are the base images
        steered = base[["label", "image", *[f"p_{name}" for name in classes]]]
        return pd.concat([table, steered.reset_index(drop=True)], axis=1).assign(
            image_root="base")
    paths = save_images(images, plan["index"], out / "images", out)
    labelled = labelled_table(plan, ctx.labeler(images), paths)
    return pd.concat([table, labelled.drop(columns=plan.columns)], axis=1).assign(
        image_root="steer")


def draw_grids(result: SteerResult, per_grid: int = 8) -> list[Path]:
    """A before/after grid per prompt, in `<run>/steer/grids/`."""
    out = result.steered_root / "grids"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for prompt_id, rows in result.table.groupby("prompt_id"):
        rows = rows.head(per_grid)
        path = out / f"prompt_{prompt_id:03d}.png"
        before_after_grid(
            *result.image_paths(rows),
            before=list(rows["base_label"]), after=list(rows["label"]),
            targets=list(rows["target"]), title=rows["prompt"].iloc[0], path=path)
        paths.append(path)
    return paths
