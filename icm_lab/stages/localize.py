"""Localize: where does the model make the implicit choice?

Implicit (the paper's map): for every (layer, step), a linear probe predicts each image's label
from the recorded activation; its held-out balanced accuracy is the layer's separability at that
step. All probes of one width are fitted as a batch, each layer's store read once.

Explicit-swap baseline (`localize.method=explicit_swap`): for each attn2 layer in turn, the text
context reaching only that layer is replaced by an explicit class prompt's, and the share of
generated images that then show the class maps where *explicit* conditioning acts.
"""

from __future__ import annotations

import json
import logging
from itertools import groupby
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from icm_lab.artefacts import Provenance, fingerprint, write_json_atomic
from icm_lab.figures import explicit_swap_comparison, layer_ranking, separability_heatmaps
from icm_lab.generation import generate_all
from icm_lab.hooks import SwapContext
from icm_lab.labeler import UNDECIDED
from icm_lab.models.layers import LayerInfo
from icm_lab.models.loading import pipeline_call_kwargs, resolve_device
from icm_lab.models.text import cross_attention_context
from icm_lab.probes import fit_probes, scores
from icm_lab.probeset import ProbeSet
from icm_lab.runner import RunContext
from icm_lab.selection import rank_layers, select_layers, step_window
from icm_lab.splits import split_indices
from icm_lab.stages.collect import sample_plan
from icm_lab.store import ActivationStore

log = logging.getLogger(__name__)
METHODS = ("implicit", "explicit_swap")


def localize(ctx: RunContext) -> ProbeSet:
    method = ctx.cfg.localize.method
    if method not in METHODS:
        raise ValueError(f"unknown localize.method {method!r}; valid: {list(METHODS)}")
    probes = implicit_map(ctx)
    report_selection(ctx, probes)
    if method == "explicit_swap":
        explicit_swap(ctx, probes)
    return probes


# -- implicit map ----------------------------------------------------------------------------


def localize_provenance(ctx: RunContext, store: ActivationStore) -> Provenance:
    cfg = ctx.cfg
    options = {k: v for k, v in cfg.probe.items() if k not in ("device", "batch_mb")}
    return Provenance(
        stage="localize", model=cfg.model.name, concept=cfg.concept.name,
        fingerprint=fingerprint(collect=store.meta["provenance"]["fingerprint"], probe=options,
                                split=cfg.localize.split, test_size=cfg.localize.test_size,
                                seed=cfg.seed),
    )


def implicit_map(ctx: RunContext) -> ProbeSet:
    store: ActivationStore = ctx.stage("collect")
    provenance = localize_provenance(ctx, store)
    with ctx.artefact(provenance) as root:
        if ProbeSet.is_complete(root):
            log.info("localize: reusing the probes at %s", root)
            return ProbeSet(root, expect=provenance)
        return _fit_and_report(ctx, store, provenance, root)


def _fit_and_report(ctx: RunContext, store: ActivationStore, provenance: Provenance,
                    root: Path) -> ProbeSet:
    classes = list(ctx.concept.classes)
    samples = store.samples
    decided = np.flatnonzero(samples["label"].to_numpy() != UNDECIDED)
    labels = samples["label"].to_numpy()[decided]
    counts = samples["label"].value_counts().reindex([*classes, UNDECIDED], fill_value=0)
    if (counts[classes] >= 2).sum() < 2:
        raise ValueError(f"localize needs at least 2 decided images in each of at least 2 "
                         f"classes; the store at {store.root} has {counts.to_dict()}. Collect "
                         "more images (collect.n_images) or lower labeler.min_confidence.")
    y = np.array([classes.index(label) for label in labels])
    train, test = split_indices(y, samples["prompt_id"].to_numpy()[decided],
                                ctx.cfg.localize.split, ctx.cfg.localize.test_size, ctx.cfg.seed)
    log.info("localize: %d images (%d undecided left out), %d train / %d test, split by %s",
             len(samples), len(samples) - len(decided), len(train), len(test),
             ctx.cfg.localize.split)
    fits, mean_diffs, tables = fit_all_layers(ctx, store, decided, y, train, test, len(classes))
    table = pd.concat(tables, ignore_index=True)
    probes = ProbeSet.write(root, provenance, classes, ctx.cfg.probe.name, fits, mean_diffs,
                            table)
    separability_heatmaps(table, root / "separability.png",
                          title=f"{ctx.cfg.model.name}: {ctx.cfg.concept.name} separability")
    return probes


def fit_all_layers(ctx: RunContext, store: ActivationStore, decided: np.ndarray, y: np.ndarray,
                   train: np.ndarray, test: np.ndarray, n_classes: int):
    """Fit every (layer, step) probe, batching the layers of one width up to `probe.batch_mb`."""
    probe = ctx.cfg.probe
    device = resolve_device(probe.device)
    options = {k: v for k, v in probe.items() if k not in ("name", "device", "batch_mb")}
    y_train = torch.as_tensor(y[train], device=device)
    y_test = torch.as_tensor(y[test], device=device)
    fits, mean_diffs, tables = {}, {}, []
    for batch in tqdm(_layer_batches(store, probe.batch_mb), desc="localize", unit="batch"):
        # One read of each layer's array: [N, S, W] float16 -> probes [L * S, n, W].
        x = torch.from_numpy(np.stack([store[layer.name][decided] for layer in batch]))
        x = x.to(device).permute(0, 2, 1, 3).reshape(-1, len(decided), batch[0].width)
        x_train = x[:, train]
        fit = fit_probes(probe.name, x_train, y_train, n_classes, **options)
        mean_diff = fit if probe.name == "mean_diff" else fit_probes(  # for steer.direction
            "mean_diff", x_train, y_train, n_classes)
        result = scores(fit.logits(x[:, test]), y_test, n_classes)
        for i, layer in enumerate(batch):
            rows = slice(i * store.n_steps, (i + 1) * store.n_steps)
            fits[layer.name] = fit.rows(rows)
            mean_diffs[layer.name] = mean_diff.rows(rows)
            tables.append(pd.DataFrame({
                "layer": layer.name, "kind": layer.kind, "width": layer.width,
                "step": np.arange(store.n_steps),
                **{k: v[rows].cpu().numpy() for k, v in result.items()},
                "n_train": len(train), "n_test": len(test),
            }))
    return fits, mean_diffs, tables


def _layer_batches(store: ActivationStore, batch_mb: float) -> list[list[LayerInfo]]:
    """Consecutive layers of equal width, as many per batch as fit in `batch_mb` of float32."""
    batches = []
    for _, same_width in groupby(store.layers, key=lambda layer: layer.width):
        batch: list[LayerInfo] = []
        for layer in same_width:
            size_mb = len(store) * store.n_steps * layer.width * 4 / 2**20
            if batch and (len(batch) + 1) * size_mb > batch_mb:
                batches.append(batch)
                batch = []
            batch.append(layer)
        batches.append(batch)
    return batches


def report_selection(ctx: RunContext, probes: ProbeSet) -> None:
    """Rank the layers over the steering window, select `layers=`, draw and log the results."""
    window = step_window(ctx.cfg.steer.start, ctx.cfg.steer.end, probes.meta["n_steps"])
    ranking = rank_layers(probes.scores, window)
    selected = [layer.name for layer in
                select_layers(ctx.cfg.layers, ctx.registry, probes.scores, window)]
    ranking.to_csv(ctx.run_dir / "layer_ranking.csv", index=False)
    write_json_atomic(ctx.run_dir / "selected_layers.json",
                      {"layers": selected, "window": [window.start, window.stop]})
    figure = layer_ranking(ranking, ctx.run_dir / "layer_ranking.png", selected=selected)
    best = probes.scores.groupby("kind")["balanced_accuracy"].max()
    log.info("localize: best balanced accuracy by kind %s; selected %s",
             json.dumps(best.round(3).to_dict()), selected)
    ctx.tracker.log_metrics({f"localize/best_{k}": float(v) for k, v in best.items()})
    ctx.tracker.log_images({"localize/separability": probes.root / "separability.png",
                            "localize/layer_ranking": figure})
    ctx.tracker.log_table("localize/scores", probes.scores)


# -- explicit-swap baseline ------------------------------------------------------------------


def explicit_swap(ctx: RunContext, probes: ProbeSet) -> pd.DataFrame:
    """Attribute rate per (attn2 layer, class) when that layer alone sees the explicit prompt."""
    concept, cfg = ctx.concept, ctx.cfg
    plan = sample_plan(concept.neutral_prompts, cfg.localize.swap_images, cfg.seed)
    prompts = list(plan["prompt"])
    kwargs = pipeline_call_kwargs(cfg.model)
    base = _label_counts(ctx, plan, [])
    rows = []
    layers = ctx.registry.select("attn2")
    for name in tqdm(concept.classes, desc="explicit swap", unit="class"):
        explicit = [concept.explicit_for(prompt, name) for prompt in prompts]
        context = cross_attention_context(ctx.pipeline, explicit, kwargs)
        for layer in layers:
            counts = _label_counts(ctx, plan, [SwapContext(layer.name, context)])
            rows.append({"layer": layer.name, "class": name, "rate": counts[name] / len(plan),
                         "base_rate": base[name] / len(plan), "n": len(plan),
                         "n_undecided": counts[UNDECIDED]})
    table = pd.DataFrame(rows)
    table.to_csv(ctx.run_dir / "explicit_swap.csv", index=False)
    table.to_parquet(ctx.run_dir / "explicit_swap.parquet", index=False)
    figure = explicit_swap_comparison(table, probes.scores[probes.scores["kind"] == "attn2"],
                                      ctx.run_dir / "explicit_swap.png")
    ctx.tracker.log_images({"localize/explicit_swap": figure})
    ctx.tracker.log_table("localize/explicit_swap", table)
    return table


def _label_counts(ctx: RunContext, plan: pd.DataFrame, swaps: list[SwapContext]) -> pd.Series:
    images = generate_all(ctx, list(plan["prompt"]), list(plan["seed"]), swaps)
    labels = ctx.labeler(images).labels
    return pd.Series(labels).value_counts().reindex([*ctx.concept.classes, UNDECIDED],
                                                    fill_value=0)
