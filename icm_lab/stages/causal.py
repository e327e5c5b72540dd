"""Causal map: where can the implicit choice be *changed*?

Separability (localize) says where a probe can read the decision. Here every candidate layer (each
recorded attn1, attn2 and bottleneck layer with probes) is steered alone toward each class, with
the same plan builder, directions and hook engine as the steer stage, on a fixed set of images
(neutral prompts, their own seed stream). The run's labeler reads them, and the effect of a
(layer, class) is the shift of the class rate against the unsteered images of the same seeds,
with a paired bootstrap 95% interval over images.

Cost: every steered sample continues from the cached prefix of its unsteered image (the latents
at the window's start, `generation.PrefixRows`), and samples of consecutive layers share batches
of `model.batch_size`. Each layer's AddVector is zero on the rows of other layers' samples, so a
batch holds several single-layer runs at once.

    artefacts/causal/<model>-<concept>-<fp>/
        causal.parquet/.csv   one row per (window, layer, class): effect, ci_low, ci_high,
                              prob_shift (+ interval), base_rate, rate, n, n_undecided; class
                              `mean`: the mean over classes, its interval by the same bootstrap
        base.parquet, steered.parquet   every image's label and class probabilities
        meta.json             settings, layers, denoiser calls against the naive count, seconds
        causal.png, causal_vs_separability.png (+ causal_windows.png with causal.thirds)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from icm_lab.config.schema import CausalConfig, SteerConfig
from icm_lab.core.errors import UserError
from icm_lab.core.layers import LAYER_KINDS, LayerInfo
from icm_lab.core.selection import ALL_CLASSES, STEERING, rank_effects, rank_layers
from icm_lab.core.selection import step_window as fraction_window
from icm_lab.engine.generation import PrefixRows
from icm_lab.engine.hooks import AddVector
from icm_lab.io.artefacts import Provenance, fingerprint, read_json, seal
from icm_lab.io.files import write_json, write_table
from icm_lab.labeling.labelers import UNDECIDED, Labels
from icm_lab.labeling.sampling import sample_plan
from icm_lab.probing.probeset import ProbeSet
from icm_lab.report.figures import causal_heatmaps, separability_vs_effect
from icm_lab.stages.localize import Localization, localization_of, probe_stages
from icm_lab.stages.registry import RunState, Stage, register
from icm_lab.stages.resources import Resources
from icm_lab.stages.steer import make_plan
from icm_lab.steering.methods import Icm
from icm_lab.steering.plans import SteerPlan

log = logging.getLogger(__name__)

CAUSAL_SEED_OFFSET = 2_000_003  # the map's seed stream, apart from collection's and evaluation's
BOOTSTRAP = 2000  # paired bootstrap resamples per interval
THIRDS = ("early", "middle", "late")


@dataclass
class CausalMap:
    table: pd.DataFrame  # causal.parquet
    root: Path
    meta: dict[str, Any]


def causal(res: Resources, cfg: CausalConfig, steer_cfg: SteerConfig,
           probes: ProbeSet) -> CausalMap:
    """The causal map of every candidate layer of the probe set, reused when it exists."""
    # Always sigma units: the map compares layers of different widths and scales.
    steer_cfg = replace(steer_cfg, alpha=cfg.alpha, start=cfg.start, end=cfg.end, units="sigma")
    layers = candidates(res, probes)
    windows = step_windows(cfg, res.model.steps)
    settings = {k: v for k, v in asdict(steer_cfg).items() if k not in ("policy", "probes")}
    provenance = Provenance("causal", res.model.name, res.concept.name, fingerprint(
        probes=probes.meta["provenance"]["fingerprint"], model=res.model_identity(),
        concept=res.concept_identity(), **res.labelling_identity(), steer=settings,
        n_images=cfg.n_images, seed=cfg.seed, windows={k: [w.start, w.stop]
                                                       for k, w in windows.items()},
        layers=[layer.name for layer in layers]))
    with res.artefact(provenance) as root:
        if res.reusable(root):
            log.info("causal: reusing the map at %s", root)
            return CausalMap(pd.read_parquet(root / "causal.parquet"), root,
                             read_json(root / "meta.json"))
        return _measure_and_report(res, cfg, steer_cfg, probes, layers, windows, provenance,
                                   root)


def candidates(res: Resources, probes: ProbeSet) -> list[LayerInfo]:
    """The layers of the model's registry of a steerable kind that have probes, in order."""
    layers = [layer for layer in res.registry
              if layer.kind in LAYER_KINDS and layer.name in probes.layers]
    if not layers:
        raise UserError(f"the causal map steers recorded attn1, attn2 and bottleneck layers; the "
                        f"probe set at {probes.root} has none of them")
    return layers


def step_windows(cfg: CausalConfig, n_steps: int) -> dict[str, range]:
    """The steering window (causal.start/end) and, with causal.thirds, the thirds of all steps
    (boundaries rounded, so they partition the steps)."""
    windows = {STEERING: fraction_window(cfg.start, cfg.end, n_steps)}
    if cfg.thirds:
        if n_steps < 3:
            raise UserError(f"causal.thirds needs at least 3 denoising steps; the model runs "
                            f"{n_steps}")
        bounds = [round(n_steps * j / 3) for j in range(4)]
        windows |= {name: range(bounds[j], bounds[j + 1]) for j, name in enumerate(THIRDS)}
    return windows


def _measure_and_report(res: Resources, cfg: CausalConfig, steer_cfg: SteerConfig,
                        probes: ProbeSet, layers: list[LayerInfo], windows: dict[str, range],
                        provenance: Provenance, root: Path) -> CausalMap:
    classes = list(res.concept.classes)
    plan = sample_plan(res.concept.neutral_prompts, cfg.n_images, cfg.seed + CAUSAL_SEED_OFFSET)
    calls, started = res.denoiser_calls(), time.perf_counter()
    base = label_table(plan, res.labeler(base_images(res, plan, windows[STEERING].start)))
    steered = []
    for name, window in windows.items():
        if name != STEERING:
            cache_prefix(res, plan, window.start)
        steered.append(steer_layers(res, steer_cfg, cfg.seed, probes, layers, plan, window)
                       .assign(window=name))
    steered = pd.concat(steered, ignore_index=True)
    table = effects(base, steered, classes, cfg.seed)
    meta = {
        "provenance": asdict(provenance), "classes": classes,
        "layers": [layer.name for layer in layers], "n_images": cfg.n_images,
        "windows": {k: [w.start, w.stop] for k, w in windows.items()},
        "plan": plan_settings(res, steer_cfg, cfg.seed, probes, layers[0], plan,
                              windows[STEERING]),
        "interval": f"paired bootstrap over images, {BOOTSTRAP} resamples, percentile 95%",
        "denoiser_calls": res.denoiser_calls() - calls,
        "naive_calls": naive_calls(len(layers), len(classes), cfg.n_images, res.model.steps,
                                   len(windows)),
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("causal: %d layers x %d classes x %d images in %d window(s): %d denoiser calls "
             "(naive, one image per call from scratch: %d), %.0f s", len(layers), len(classes),
             cfg.n_images, len(windows), meta["denoiser_calls"], meta["naive_calls"],
             meta["seconds"])
    write_table(base, root / "base.parquet")
    write_table(steered, root / "steered.parquet")
    write_table(table, root / "causal.parquet")
    write_table(table, root / "causal.csv")
    write_json(root / "meta.json", meta)
    draw(res, table, probes, windows, root)
    seal(root)
    return CausalMap(table, root, meta)


def naive_calls(n_layers: int, n_classes: int, n_images: int, n_steps: int,
                n_windows: int) -> int:
    """Denoiser calls of the map run one image at a time, each from scratch."""
    return n_layers * n_classes * n_images * n_steps * n_windows


def base_images(res: Resources, plan: pd.DataFrame, start: int) -> list:
    """The unsteered images of the plan, leaving behind (or continuing from) the cached prefix of
    their first `start` steps."""
    prompts, seeds = list(plan["prompt"]), list(plan["seed"])
    return res.generator.all(prompts, seeds, desc="causal: base images",
                             prefix=res.prefix(prompts, seeds, start))


def cache_prefix(res: Resources, plan: pd.DataFrame, start: int) -> None:
    """The cached prefix of the plan's unsteered images at `start` (another window's), generated
    unless it exists or cannot be (start 0, or a scheduler with state)."""
    prompts, seeds = list(plan["prompt"]), list(plan["seed"])
    prefix, size = res.prefix(prompts, seeds, start), res.model.batch_size
    if prefix is not None and not all(prefix.path(first, min(first + size, len(plan))).exists()
                                      for first in range(0, len(plan), size)):
        res.generator.all(prompts, seeds, desc=f"causal: prefix of steps 0-{start - 1}",
                          prefix=prefix)


def label_table(plan: pd.DataFrame, labels: Labels) -> pd.DataFrame:
    """The plan's rows with each image's label and class probabilities."""
    table = plan.reset_index(drop=True).assign(label=labels.labels)
    for k, name in enumerate(labels.classes):
        table[f"p_{name}"] = labels.probs[:, k]
    return table


def layer_plan(res: Resources, steer_cfg: SteerConfig, seed: int, probes: ProbeSet,
               layer: LayerInfo, plan: pd.DataFrame, window: range) -> SteerPlan:
    """ICM on one layer, the plan's images steered toward each class in turn (class-major): the
    steer stage's own plan builder, so its directions and strength are the same."""
    n_classes = len(res.concept.classes)
    tiled = pd.concat([plan] * n_classes, ignore_index=True)
    targets = np.repeat(np.arange(n_classes), len(plan))
    return make_plan(res, steer_cfg, Icm(), seed, Localization(probes, pd.DataFrame(), [layer]),
                     tiled, targets, window)


def plan_settings(res: Resources, steer_cfg: SteerConfig, seed: int, probes: ProbeSet,
                  layer: LayerInfo, plan: pd.DataFrame, window: range) -> dict[str, Any]:
    """What every single-layer plan of the map shares (method, alpha, window, direction, ...)."""
    one = layer_plan(res, steer_cfg, seed, probes, layer, plan, window)
    per_sample = ("prompts", "seeds", "targets", "edits", "model", "classes")
    return {k: v for k, v in asdict(one).items() if k not in per_sample}


def steer_layers(res: Resources, steer_cfg: SteerConfig, seed: int, probes: ProbeSet,
                 layers: list[LayerInfo], plan: pd.DataFrame, window: range) -> pd.DataFrame:
    """Every layer alone toward every class in one window: the labelled steered images.

    Samples run layer-major, then class, then image; each batch of `model.batch_size` holds the
    AddVectors of the layers whose samples it contains, zero on the other rows."""
    n, n_classes = len(plan), len(res.concept.classes)
    per_layer = n * n_classes
    total, size = per_layer * len(layers), res.model.batch_size
    image = np.tile(np.arange(n), n_classes * len(layers))
    prompts, seeds = list(plan["prompt"].iloc[image]), list(plan["seed"].iloc[image])
    source = res.prefix(list(plan["prompt"]), list(plan["seed"]), window.start)
    prefix = None if source is None else PrefixRows(source, tuple(int(i) for i in image), size, n)
    vectors: dict[int, AddVector] = {}  # the current layers' interventions, built on first use
    rows = []
    for first in tqdm(range(0, total, size), desc=f"causal: steps {window.start}-"
                      f"{window.stop - 1}", unit="batch"):
        stop = min(first + size, total)
        edits = []
        for index in range(first // per_layer, (stop - 1) // per_layer + 1):
            if index not in vectors:
                vectors = {k: v for k, v in vectors.items() if k >= first // per_layer}
                vectors[index] = layer_plan(res, steer_cfg, seed, probes, layers[index], plan,
                                            window).interventions()[0]
            edits.append(batch_rows(vectors[index], index * per_layer, first, stop))
        images, _ = res.generator.batch(prompts[first:stop], seeds[first:stop], edits,
                                        prefix=prefix, first=first)
        labels = res.labeler(images)
        sample = np.arange(first, stop)
        rows.append(label_table(plan.iloc[image[first:stop]], labels).assign(
            layer=[layers[s // per_layer].name for s in sample],
            kind=[layers[s // per_layer].kind for s in sample],
            target=[res.concept.classes[s % per_layer // n] for s in sample]))
    return pd.concat(rows, ignore_index=True)


def batch_rows(intervention: AddVector, offset: int, first: int, stop: int) -> AddVector:
    """The intervention of samples `offset ...` (one layer's run) on the batch `first:stop`:
    its own rows where they fall in the batch, zero (untouched) elsewhere."""
    lo, hi = max(first, offset), min(stop, offset + len(intervention.vectors))
    vectors = intervention.vectors.new_zeros((stop - first, *intervention.vectors.shape[1:]))
    vectors[lo - first:hi - first] = intervention.vectors[lo - offset:hi - offset]
    return replace(intervention, vectors=vectors)


# -- effects ---------------------------------------------------------------------------------


def effects(base: pd.DataFrame, steered: pd.DataFrame, classes: list[str],
            seed: int) -> pd.DataFrame:
    """Per (window, layer, class): the paired shift of the class rate (and of its probability)
    from the base image to the image steered toward it, with 95% intervals; class `mean`: each
    image's shift averaged over the classes."""
    resamples = np.random.default_rng(seed).integers(0, len(base), (BOOTSTRAP, len(base)))
    rows = []
    for (window, layer, kind), runs in steered.groupby(["window", "layer", "kind"], sort=False):
        rate, prob, rates = [], [], []
        for name in classes:
            run = runs[runs["target"] == name].sort_values("index")
            if not np.array_equal(run["index"].to_numpy(), base["index"].to_numpy()):
                raise ValueError(f"the steered images of {layer} toward {name} are not the "
                                 "base images' seeds")
            rate.append((run["label"].to_numpy() == name).astype(float)
                        - (base["label"].to_numpy() == name))
            prob.append(run[f"p_{name}"].to_numpy() - base[f"p_{name}"].to_numpy())
            rates.append(counts(base, run, name))
            rows.append(shift_row(window, layer, kind, name, rate[-1], prob[-1], resamples)
                        | rates[-1])
        rows.append(shift_row(window, layer, kind, ALL_CLASSES, np.mean(rate, axis=0),
                              np.mean(prob, axis=0), resamples)
                    | pd.DataFrame(rates).mean().to_dict()
                    | {"n_undecided": int((runs["label"] == UNDECIDED).sum())})
    return pd.DataFrame(rows)


def shift_row(window: str, layer: str, kind: str, name: str, rate: np.ndarray, prob: np.ndarray,
              resamples: np.ndarray) -> dict[str, Any]:
    low, high = bootstrap_interval(rate, resamples)
    prob_low, prob_high = bootstrap_interval(prob, resamples)
    return {"window": window, "layer": layer, "kind": kind, "class": name,
            "effect": float(rate.mean()), "ci_low": low, "ci_high": high,
            "prob_shift": _nanmean(prob), "prob_ci_low": prob_low, "prob_ci_high": prob_high,
            "n": len(rate)}


def counts(base: pd.DataFrame, run: pd.DataFrame, name: str) -> dict[str, Any]:
    return {"base_rate": float((base["label"] == name).mean()),
            "rate": float((run["label"] == name).mean()),
            "n_undecided": int((run["label"] == UNDECIDED).sum())}


def bootstrap_interval(shift: np.ndarray, resamples: np.ndarray) -> tuple[float, float]:
    """The percentile 95% interval of the mean paired shift over images resampled with
    replacement (`resamples`: [B, n] image indices); images without a reading (NaN) left out
    of each mean. NaN when no image has one."""
    if np.isnan(shift).all():
        return float("nan"), float("nan")
    means = _nanmean_rows(shift[resamples])
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return float(low), float(high)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    present = ~np.isnan(values)
    total = np.where(present, values, 0).sum(axis=1)
    count = present.sum(axis=1)
    return np.divide(total, count, out=np.full(len(values), np.nan), where=count > 0)


# -- figures and selection -------------------------------------------------------------------


def draw(res: Resources, table: pd.DataFrame, probes: ProbeSet, windows: dict[str, range],
         root: Path) -> None:
    """The map per layer and class, the map per window (with thirds), and the scatter of
    separability against effect."""
    order = list(dict.fromkeys(probes.scores["layer"]))  # the separability heatmap's order
    name = f"{res.model.name}, {res.concept.name}"
    main = table[table["window"] == STEERING]
    steps = windows[STEERING]
    causal_heatmaps(main, order, "class", root / "causal.png",
                    title=f"{name}: shift of the target-class rate when one layer alone is "
                          f"steered toward it (steps {steps.start}-{steps.stop - 1})")
    if len(windows) > 1:
        causal_heatmaps(table[table["class"] == ALL_CLASSES], order, "window",
                        root / "causal_windows.png",
                        title=f"{name}: mean shift of the target-class rate over classes, per "
                              f"steered window " + ", ".join(
                                  f"{k} {w.start}-{w.stop - 1}" for k, w in windows.items()))
    separability = rank_layers(probes.scores, steps)
    effect = rank_effects(table)
    points = separability.merge(effect, on=["layer", "kind"])
    separability_vs_effect(points, root / "causal_vs_separability.png",
                           chance=1 / len(probes.classes),
                           title=f"{name}: where the choice can be read vs where it can be "
                                 f"changed (steps {steps.start}-{steps.stop - 1})")


# -- in the run's stage graph ----------------------------------------------------------------


def run_causal(run: RunState) -> CausalMap:
    return causal(run.res, run.parts.sections["causal"], run.parts.sections["steer"],
                  localization_of(run).probes)


register(Stage("causal", section="causal", result=CausalMap, needs=probe_stages, run=run_causal))
