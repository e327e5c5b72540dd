"""Steer: generate the evaluation prompts twice from the same seeds, unsteered (base) and
steered, and label both.

Base images depend only on the model, the concept's evaluation prompts and the seeds, so they
are a content-addressed artefact that every steering run (an alpha sweep, a method comparison)
reuses. Steered images, the per-image table, the steering plan and before/after grids go to the
run directory.

    <run>/steer/images/<index>.png    steered images (same index and seed as the base image)
    <run>/steer/images.parquet/.csv   index, prompt, seed, target, steered, base_label, label, ...
    <run>/steer/plan.json (+ .safetensors)  the steering plan, replayable
    <run>/steer/grids/prompt_<i>.png  before/after grid per prompt
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from icm_lab.config.schema import SteerConfig
from icm_lab.core.selection import step_window
from icm_lab.io.artefacts import Provenance, fingerprint, seal
from icm_lab.io.files import write_table
from icm_lab.labeling.labelers import UNDECIDED
from icm_lab.labeling.sampling import eval_plan, labelled_table, save_images
from icm_lab.report.figures import before_after_grid
from icm_lab.stages.localize import (
    Localization,
    localization_of,
    probe_stages,
    select_by_effect,
)
from icm_lab.stages.registry import RunState, Stage, register
from icm_lab.stages.resources import Resources
from icm_lab.steering.methods import SteeringMethod
from icm_lab.steering.plans import UNTOUCHED, SteerPlan, assign_targets

log = logging.getLogger(__name__)


@dataclass
class SteerResult:
    table: pd.DataFrame  # one row per sample: base and steered label side by side
    base_root: Path  # where base image paths are relative to
    steered_root: Path  # where steered image paths are relative to
    plan: SteerPlan  # method, alpha, window, layers, directions: what evaluate reports

    def image_paths(self, rows: pd.DataFrame | None = None) -> tuple[list[Path], list[Path]]:
        """Absolute paths of the base and steered image of each row (method=none: both base)."""
        rows = self.table if rows is None else rows
        roots = {"base": self.base_root, "steer": self.steered_root}
        return ([self.base_root / p for p in rows["base_image"]],
                [roots[root] / p for root, p in zip(rows["image_root"], rows["image"],
                                                    strict=True)])


def base_images(res: Resources, plan: pd.DataFrame, prefix_step: int | None
                ) -> tuple[pd.DataFrame, Path]:
    """The unsteered images of the plan, labelled; generated once per model/concept/seeds,
    leaving behind the cached prefix of their first `prefix_step` steps for the steered runs."""
    concept = res.concept
    provenance = Provenance("base", res.model.name, concept.name, fingerprint(
        model=res.model_identity(), prompts=list(plan["prompt"]), seeds=list(plan["seed"]),
        **res.labelling_identity(), classes=list(concept.classes),
        texts=concept.classifier_texts,
    ))
    with res.artefact(provenance) as root:
        table_path = root / "images.parquet"
        if res.reusable(root):
            log.info("steer: reusing the base images at %s", root)
            return pd.read_parquet(table_path), root
        prompts, seeds = list(plan["prompt"]), list(plan["seed"])
        images = res.generator.all(prompts, seeds, desc="base images",
                                   prefix=res.prefix(prompts, seeds, prefix_step))
        paths = save_images(images, plan["index"], root / "images", root)
        table = labelled_table(plan, res.labeler(images), paths)
        write_table(table, table_path)
        seal(root)
        return table, root


def steer(res: Resources, cfg: SteerConfig, method: SteeringMethod, per_prompt: int, seed: int,
          localization: Localization | None) -> SteerResult:
    """Base and steered images of the concept's evaluation prompts. `localization` gives the
    probes and selected layers to methods that use them."""
    concept = res.concept
    plan = eval_plan(concept.eval_prompts, per_prompt, seed)
    # Every method that adds vectors starts at the window's start: its runs share that prefix.
    window = step_window(cfg.start, cfg.end, res.model.steps)
    base, base_root = base_images(res, plan, window.start)
    targets = plan_targets(concept.classes, concept.target, cfg.policy, seed, plan, base)
    steer_plan = make_plan(res, cfg, method, seed, localization, plan, targets, window)
    if steer_plan.edits:
        log.info("steer: %s, alpha %s, steps %d-%d, layers %s", method, steer_plan.alpha,
                 steer_plan.start, steer_plan.end - 1, steer_plan.layers)
    else:
        log.info("steer: %s (no layer is written to)", method)

    out = res.run_dir / "steer"
    out.mkdir(parents=True, exist_ok=True)
    steer_plan.save(out)
    images = None
    if method.generates:
        images = res.generator.all(
            steer_plan.prompts, steer_plan.seeds, steer_plan.interventions(),
            desc=f"steer ({method.name})",
            prefix=res.prefix(steer_plan.prompts, steer_plan.seeds, steer_plan.start))
    table = result_table(res, plan, base, targets, images, out, method.generates)
    write_table(table, out / "images.parquet")
    write_table(table, out / "images.csv")
    result = SteerResult(table, base_root, out, steer_plan)
    grids = draw_grids(result)
    res.tracker.log_images({f"steer/grid_{i}": path for i, path in enumerate(grids)})
    res.tracker.log_table("steer/images", table)
    return result


def make_plan(res: Resources, cfg: SteerConfig, method: SteeringMethod, seed: int,
              localization: Localization | None, plan: pd.DataFrame,
              targets: np.ndarray, window: range) -> SteerPlan:
    """The method's layers and directions, the targets and prompts, as a SteerPlan; vectors
    are added at the steps of `window`."""
    concept, n_steps = res.concept, res.model.steps
    edits, probe_set = [], None
    if method.uses_probes:
        probes = localization.probes
        probe_set = probes.meta["provenance"]["fingerprint"]
        layers = method.layers(localization.selected, res.registry, res.adapter)
        for index, layer in enumerate(layers):
            edit = method.edit(layer, probes, cfg.direction, cfg.units, n_steps,
                               len(concept.classes), seed, index)
            if {edit.directions.shape[0], edit.scale.shape[0]} != {n_steps}:
                raise ValueError(f"probes at {probes.root} have {edit.scale.shape[0]} steps "
                                 f"but the model runs {n_steps}")
            edits.append(edit)
    words = [concept.word(k) for k in concept.classes]
    prompts = [p if t == UNTOUCHED else method.prompt(p, words[t])
               for p, t in zip(plan["prompt"], targets, strict=True)]
    hooked = bool(edits)  # alpha and the window mean nothing to a method that adds no vector
    return SteerPlan(
        method=method.name, alpha=float(cfg.alpha) if hooked else None,
        start=window.start if hooked else None, end=window.stop if hooked else None,
        halves=cfg.halves, renorm=cfg.renorm, direction=method.source(cfg.direction),
        probe_set=probe_set,
        classes=list(concept.classes), prompts=prompts,
        seeds=[int(s) for s in plan["seed"]], targets=[int(t) for t in targets],
        model=asdict(res.model), units=cfg.units if hooked else None, edits=edits)


def plan_targets(classes: tuple[str, ...], target: np.ndarray, policy: str, seed: int,
                 plan: pd.DataFrame, base: pd.DataFrame) -> np.ndarray:
    """Exact target counts within each prompt (see steering.assign_targets)."""
    base_class = np.array([classes.index(x) if x != UNDECIDED else -1 for x in base["label"]])
    targets = np.full(len(plan), UNTOUCHED)
    for prompt_id, rows in plan.groupby("prompt_id").groups.items():
        rows = np.asarray(rows)
        targets[rows] = assign_targets(len(rows), target, seed + int(prompt_id), policy,
                                       base_class[rows])
    return targets


def result_table(res: Resources, plan: pd.DataFrame, base: pd.DataFrame, targets: np.ndarray,
                 images: list | None, out: Path, generates: bool) -> pd.DataFrame:
    classes = list(res.concept.classes)
    table = plan.assign(
        target=[classes[t] if t != UNTOUCHED else "" for t in targets],
        steered=(targets != UNTOUCHED) & generates,
        base_label=base["label"].to_numpy(), base_image=base["image"].to_numpy(),
    )
    for name in classes:
        table[f"base_p_{name}"] = base[f"p_{name}"].to_numpy()
    table["base_weight"] = base["weight"].to_numpy()
    if images is None:  # method=none: the steered images are the base images
        steered = base[["label", "image", *[f"p_{name}" for name in classes], "weight"]]
        return pd.concat([table, steered.reset_index(drop=True)], axis=1).assign(
            image_root="base")
    paths = save_images(images, plan["index"], out / "images", out)
    labelled = labelled_table(plan, res.labeler(images), paths)
    return pd.concat([table, labelled.drop(columns=plan.columns)], axis=1).assign(
        image_root="steer")


def draw_grids(result: SteerResult, per_grid: int = 8) -> list[Path]:
    """A before/after grid per prompt, in `<run>/steer/grids/`."""
    out = result.steered_root / "grids"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for prompt_id, rows in result.table.groupby("prompt_id"):
        shown = rows.head(per_grid)
        path = out / f"prompt_{prompt_id:03d}.png"
        before_after_grid(
            *result.image_paths(shown),
            before=list(shown["base_label"]), after=list(shown["label"]),
            targets=[t if steered else "" for t, steered in zip(  # method=none: no target
                shown["target"], shown["steered"], strict=True)], path=path,
            title=f"{rows['prompt'].iloc[0]} ({shown_of(len(shown), len(rows))})")
        paths.append(path)
    return paths


def shown_of(shown: int, total: int) -> str:
    """Which of a prompt's images a grid shows."""
    return f"all {total} images" if shown == total else \
        f"the first {shown} of {total} images, in seed order"


# -- in the run's stage graph ----------------------------------------------------------------


def steer_needs(run: RunState) -> tuple[str, ...]:
    """Probes for a method that reads them, and the causal map when it ranks the layers."""
    if not run.method.uses_probes:
        return ()
    return probe_stages(run) + (("causal",) if run.selection.needs_causal_map else ())


def run_steer(run: RunState) -> SteerResult:
    localization = None
    if run.method.uses_probes:
        localization = localization_of(run)
        if run.selection.needs_causal_map:
            localization = select_by_effect(run.res, localization, run.results["causal"],
                                            run.selection)
    return steer(run.res, run.parts.sections["steer"], run.method,
                 run.parts.sections["eval"].n_images_per_prompt, run.cfg.seed, localization)


register(Stage("steer", section="steer", result=SteerResult, needs=steer_needs, run=run_steer))
