"""Localize: where does the model make the implicit choice?

Implicit (the paper's map): for every (layer, step), a linear probe predicts each image's label
from the recorded activation; its held-out balanced accuracy, averaged over `localize.folds`
folds, is the layer's separability at that step. All probes of one width are fitted as a batch,
each layer's store read once.

Explicit-swap baseline (`localize.method=explicit_swap`): for each attn2 layer in turn, the text
context reaching only that layer is replaced by an explicit class prompt's, and the share of
generated images that then show the class maps where *explicit* conditioning acts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from icm_lab.config.schema import LocalizeConfig
from icm_lab.core.errors import UserError
from icm_lab.core.layers import LayerInfo
from icm_lab.core.selection import STEERING, LayerSelection, rank_effects, rank_layers
from icm_lab.engine.hooks import SwapContext
from icm_lab.io.artefacts import Provenance, fingerprint
from icm_lab.io.files import write_json, write_table
from icm_lab.io.store import ActivationStore
from icm_lab.labeling.labelers import UNDECIDED
from icm_lab.labeling.sampling import sample_plan
from icm_lab.models.loading import resolve_device
from icm_lab.probing.probes import Probe, fit_probes, scores, width_batches
from icm_lab.probing.probeset import ProbeSet
from icm_lab.probing.splits import fold_indices
from icm_lab.report.figures import explicit_swap_comparison, layer_ranking, separability_heatmaps
from icm_lab.stages.registry import RunState, Stage, register
from icm_lab.stages.resources import Resources

log = logging.getLogger(__name__)


@dataclass
class Localization:
    """The probe set, the layer ranking over the steering window, and the selected layers."""

    probes: ProbeSet
    ranking: pd.DataFrame
    selected: list[LayerInfo]


def localize(res: Resources, cfg: LocalizeConfig, probe: Probe, store: ActivationStore,
             selection: LayerSelection, seed: int) -> Localization:
    probes = implicit_map(res, cfg, probe, store, seed)
    localization = report_selection(res, probes, selection)
    if cfg.method == "explicit_swap":
        explicit_swap(res, cfg.swap_images, probes, seed)
    return localization


def load_localization(res: Resources, path: Path, selection: LayerSelection) -> Localization:
    """A probe set made by another run (`steer.probes=`), refused if from another model or
    concept, with this run's layer selection."""
    probes = ProbeSet(Path(path))
    found = probes.meta["provenance"]
    for key, expected in (("model", res.model.name), ("concept", res.concept.name)):
        if found[key] != expected:
            raise UserError(f"the probes at {path} were made for {key} {found[key]!r}, but this "
                            f"run steers {key} {expected!r}; localize with this {key} first")
    return report_selection(res, probes, selection)


# -- implicit map ----------------------------------------------------------------------------


def localize_provenance(res: Resources, cfg: LocalizeConfig, probe: Probe,
                        store: ActivationStore, seed: int) -> Provenance:
    return Provenance(
        stage="localize", model=res.model.name, concept=res.concept.name,
        fingerprint=fingerprint(collect=store.meta["provenance"]["fingerprint"],
                                probe={"name": probe.name, **probe.options}, split=cfg.split,
                                folds=cfg.folds,  # test_size only shapes the single split
                                test_size=cfg.test_size if cfg.folds == 1 else None, seed=seed,
                                layout=ProbeSet.LAYOUT),
    )


def implicit_map(res: Resources, cfg: LocalizeConfig, probe: Probe, store: ActivationStore,
                 seed: int) -> ProbeSet:
    provenance = localize_provenance(res, cfg, probe, store, seed)
    with res.artefact(provenance) as root:
        if res.reusable(root):
            log.info("localize: reusing the probes at %s", root)
            return ProbeSet(root, expect=provenance)
        return _fit_and_report(res, cfg, probe, store, provenance, root, seed)


def _fit_and_report(res: Resources, cfg: LocalizeConfig, probe: Probe, store: ActivationStore,
                    provenance: Provenance, root: Path, seed: int) -> ProbeSet:
    classes = list(res.concept.classes)
    samples = store.samples
    decided = np.flatnonzero(samples["label"].to_numpy() != UNDECIDED)
    labels = samples["label"].to_numpy()[decided]
    counts = samples["label"].value_counts().reindex([*classes, UNDECIDED], fill_value=0)
    if (counts[classes] >= 2).sum() < 2:
        raise UserError(f"localize needs at least 2 decided images in each of at least 2 "
                        f"classes; the store at {store.root} has {counts.to_dict()}. Collect "
                        "more images (collect.n_images) or lower labeler.min_confidence.")
    y = np.array([classes.index(label) for label in labels])
    groups = samples["prompt_id"].to_numpy()[decided]
    check_folds(cfg, labels, groups)
    folds = fold_indices(y, groups, cfg.split, cfg.folds, cfg.test_size, seed)
    log.info("localize: %d images (%d undecided left out), %d fold(s) of about %d train / %d "
             "test, split by %s", len(samples), len(samples) - len(decided), len(folds),
             len(folds[0][0]), len(folds[0][1]), cfg.split)
    fits, mean_diffs, tables = fit_all_layers(probe, store, decided, y, folds, len(classes))
    table = pd.concat(tables, ignore_index=True)
    held_out = f"mean over {len(folds)} folds" if len(folds) > 1 else "one held-out split"
    separability_heatmaps(table, root / "separability.png", chance=1 / len(classes),
                          title=f"{res.model.name}, {res.concept.name}: how well a linear probe "
                                f"reads the {len(classes)} classes from each layer and step "
                                f"({held_out})")
    return ProbeSet.write(root, provenance, classes, probe.name, fits, mean_diffs, table,
                          store)


def check_folds(cfg: LocalizeConfig, labels: np.ndarray, groups: np.ndarray) -> None:
    """Refuse k folds that some class cannot fill: each class needs `folds` images (split=image)
    or `folds` prompts (split=prompt), so that every fold can test it."""
    if cfg.folds == 1:
        return
    unit = "images" if cfg.split == "image" else "prompts"
    units = groups if cfg.split == "prompt" else np.arange(len(labels))
    per_class = pd.Series(units).groupby(labels).nunique()
    if per_class.min() < cfg.folds:
        raise UserError(f"localize.folds={cfg.folds} needs at least {cfg.folds} {unit} of each "
                        f"decided class (split={cfg.split}); found {per_class.to_dict()}: lower "
                        "localize.folds, collect more images (collect.n_images) or use "
                        "localize.split=image")


def fit_all_layers(probe: Probe, store: ActivationStore, decided: np.ndarray, y: np.ndarray,
                   folds: list[tuple[np.ndarray, np.ndarray]], n_classes: int):
    """Score every (layer, step) probe on each fold, then fit it on all decided images: those
    probes (weights, and directions for steering) are what the probe set keeps. Layers of one
    width are batched up to `probe.batch_mb`, each read once."""
    device = resolve_device(probe.device)
    y_all = torch.as_tensor(y, device=device)
    fits, mean_diffs, tables = {}, {}, []
    batches = width_batches(store.layers, len(store), store.n_steps, probe.batch_mb)
    for batch in tqdm(batches, desc="localize", unit="batch"):
        x = _probes(store, batch, decided, device)
        result = fold_scores(probe, x, y_all, folds, n_classes)
        # The folds only score. The saved probes and the steering directions (w / sigma and
        # mean_diff) are fitted afterwards on every decided image.
        fit = probe.fit(x, y_all, n_classes)
        mean_diff = fit if probe.name == "mean_diff" else fit_probes(  # for steer.direction
            "mean_diff", x, y_all, n_classes)
        for i, layer in enumerate(batch):
            rows = slice(i * store.n_steps, (i + 1) * store.n_steps)
            fits[layer.name] = fit.rows(rows)
            mean_diffs[layer.name] = mean_diff.rows(rows)
            tables.append(pd.DataFrame({
                "layer": layer.name, "kind": layer.kind, "width": layer.width,
                "step": np.arange(store.n_steps),
                **{k: v[rows] for k, v in result.items()},
                "folds": len(folds),
                "n_train": round(np.mean([len(train) for train, _ in folds])),
                "n_test": round(np.mean([len(test) for _, test in folds])),
            }))
    return fits, mean_diffs, tables


def fold_scores(probe: Probe, x: torch.Tensor, y: torch.Tensor,
                folds: list[tuple[np.ndarray, np.ndarray]], n_classes: int
                ) -> dict[str, np.ndarray]:
    """Each score's mean over the folds and, as `<score>_std`, its standard deviation over them
    (ddof 1; NaN for one fold), each `[P]`. One solver call per fold: a call shares one sample
    set and one label vector across all its probes, and the folds differ in both."""
    per_fold = []
    for train, test in folds:
        train, test = (torch.as_tensor(i, device=x.device) for i in (train, test))
        fit = probe.fit(x[:, train], y[train], n_classes)
        per_fold.append(scores(fit.logits(x[:, test]), y[test], n_classes))
    result = {}
    for name in per_fold[0]:
        values = torch.stack([fold[name] for fold in per_fold]).cpu().numpy()  # [k, P]
        result[name] = np.nanmean(values, axis=0)
        result[f"{name}_std"] = (np.nanstd(values, axis=0, ddof=1) if len(folds) > 1
                                 else np.full(values.shape[1], np.nan))
    return result


def _probes(store: ActivationStore, batch: list[LayerInfo], rows: np.ndarray,
            device: torch.device | str) -> torch.Tensor:
    """The probes `[L * S, n, W]` (float16) of `rows`, read once from each layer's `[N, S, W]`
    array. Rows are gathered in the store's layout, where each is contiguous: permuting first
    would copy every activation once more. For one layer the result is a view, which the probe
    backends convert chunk by chunk."""
    x = torch.from_numpy(np.stack([store[layer.name][rows] for layer in batch]))  # [L, n, S, W]
    return x.to(device).transpose(1, 2).reshape(-1, len(rows), batch[0].width)


def report_selection(res: Resources, probes: ProbeSet,
                     selection: LayerSelection) -> Localization:
    """Rank the layers over the steering window, select `layers=`, draw and log the results."""
    ranking = rank_layers(probes.scores, selection.window)
    selected = selection.resolve(res.registry, probes.scores)
    names = [layer.name for layer in selected]
    write_table(ranking, res.run_dir / "layer_ranking.csv")
    write_json(res.run_dir / "selected_layers.json",
                      {"layers": names, "window": [selection.window.start,
                                                   selection.window.stop]})
    figure = layer_ranking(ranking, res.run_dir / "layer_ranking.png",
                           chance=1 / len(probes.classes), window=selection.window,
                           selected=names,
                           title=f"{res.model.name}, {res.concept.name}: layers ranked by "
                                 f"separability")
    best = probes.scores.groupby("kind")["balanced_accuracy"].max()
    log.info("localize: best balanced accuracy by kind %s; top by separability %s",
             json.dumps(best.round(3).to_dict()), names)
    res.tracker.log_metrics({f"localize/best_{k}": float(v) for k, v in best.items()})
    res.tracker.log_images({"localize/separability": probes.root / "separability.png",
                            "localize/layer_ranking": figure})
    res.tracker.log_table("localize/scores", probes.scores)
    return Localization(probes, ranking, selected)


# -- explicit-swap baseline ------------------------------------------------------------------


def explicit_swap(res: Resources, n_images: int, probes: ProbeSet, seed: int) -> pd.DataFrame:
    """Attribute rate per (attn2 layer, class) when that layer alone sees the explicit prompt."""
    concept = res.concept
    plan = sample_plan(concept.neutral_prompts, n_images, seed)
    prompts = list(plan["prompt"])
    kwargs = res.model.pipeline_kwargs()
    base = _label_counts(res, plan, [])
    rows = []
    layers = res.registry.select("attn2")
    for name in tqdm(concept.classes, desc="explicit swap", unit="class"):
        explicit = [concept.explicit_for(prompt, name) for prompt in prompts]
        text = res.adapter.text_context(res.pipeline, explicit, kwargs)
        for layer in layers:
            counts = _label_counts(res, plan, [SwapContext.of(layer.name, text)])
            rows.append({"layer": layer.name, "class": name, "rate": counts[name] / len(plan),
                         "base_rate": base[name] / len(plan), "n": len(plan),
                         "n_undecided": counts[UNDECIDED]})
    table = pd.DataFrame(rows)
    write_table(table, res.run_dir / "explicit_swap.csv")
    write_table(table, res.run_dir / "explicit_swap.parquet")
    figure = explicit_swap_comparison(table, probes.scores[probes.scores["kind"] == "attn2"],
                                      res.run_dir / "explicit_swap.png")
    res.tracker.log_images({"localize/explicit_swap": figure})
    res.tracker.log_table("localize/explicit_swap", table)
    return table


def _label_counts(res: Resources, plan: pd.DataFrame, swaps: list[SwapContext]) -> pd.Series:
    images = res.generator.all(list(plan["prompt"]), list(plan["seed"]), swaps)
    labels = res.labeler(images).labels
    return pd.Series(labels).value_counts().reindex([*res.concept.classes, UNDECIDED],
                                                    fill_value=0)


def select_by_effect(res: Resources, localization: Localization, causal_map: Any,
                     selection: LayerSelection) -> Localization:
    """`layers=auto` with `layers.rank_by=causal`: the localization with the top-k layers by
    causal effect (`causal_map`: the causal stage's `CausalMap`); `<run>/causal_ranking.csv`
    and `selected_layers.json` say so."""
    selected = selection.resolve(res.registry, localization.probes.scores, causal_map.table)
    names = [layer.name for layer in selected]
    write_table(rank_effects(causal_map.table), res.run_dir / "causal_ranking.csv")
    window = causal_map.meta["windows"][STEERING]  # where the effects were measured
    write_json(res.run_dir / "selected_layers.json",
               {"layers": names, "rank_by": "causal", "causal_map": str(causal_map.root),
                "window": window})
    # Localize drew the ranking with its own picks; outline the layers actually steered.
    layer_ranking(localization.ranking, res.run_dir / "layer_ranking.png",
                  chance=1 / len(localization.probes.classes), window=selection.window,
                  selected=names, title=f"{res.model.name}, {res.concept.name}: layers ranked "
                  "by separability; outlined: the top by causal effect (steered)")
    log.info("causal: layers.rank_by=causal selects %s", names)
    return replace(localization, selected=selected)


# -- in the run's stage graph ----------------------------------------------------------------


def reported_selection(run: RunState) -> LayerSelection:
    """The selection localize reports: rank_by=causal re-selects once the causal map exists
    (`select_by_effect`)."""
    return replace(run.selection, rank_by="separability")


def probe_stages(run: RunState) -> tuple[str, ...]:
    """What a stage that reads probes needs: localize, unless another run's probe set
    (`steer.probes`) replaces it."""
    return () if run.cfg.steer.probes else ("localize",)


def localization_of(run: RunState) -> Localization:
    """The probes steering reads: this run's, or another run's (`steer.probes`, loaded once)."""
    external = run.cfg.steer.probes
    if not external:
        return run.results["localize"]
    if run.external is None:
        run.external = load_localization(run.res, Path(external), reported_selection(run))
    return run.external


def run_localize(run: RunState) -> Localization:
    return localize(run.res, run.parts.sections["localize"], run.parts.probe,
                    run.results["collect"], reported_selection(run), run.cfg.seed)


register(Stage("localize", section="localize", result=Localization,
               needs=lambda run: ("collect",), run=run_localize))
