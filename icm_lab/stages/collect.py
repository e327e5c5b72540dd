"""Collect: generate images from the neutral prompts, record every chosen layer at every step,
label each image, and write the activation store.

Sample i uses prompt i mod P (round-robin, so prompts are balanced) and a seed derived from
(seed, i) alone, so a sample does not depend on N or on which batch or shard makes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from icm_lab.artefacts import Provenance, fingerprint
from icm_lab.generation import generate
from icm_lab.labeler import Labels
from icm_lab.models.layers import LAYER_KINDS, LayerInfo
from icm_lab.runner import RunContext
from icm_lab.store import ActivationStore, StoreWriter

log = logging.getLogger(__name__)


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_plan(prompts: tuple[str, ...], n_images: int, seed: int) -> pd.DataFrame:
    """Which prompt and seed each of the N samples uses."""
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images <= 0:
        raise ValueError(f"collect.n_images must be a positive integer, got {n_images!r}")
    index = np.arange(n_images)
    prompt_id = index % len(prompts)
    return pd.DataFrame({
        "index": index,
        "prompt_id": prompt_id,
        "prompt": [prompts[i] for i in prompt_id],
        "seed": [sample_seed(seed, i) for i in index],
    })


def recorded_layers(ctx: RunContext) -> list[LayerInfo]:
    """`collect.record`: layer kinds and/or explicit layer names, in registry order."""
    chosen: set[str] = set()
    for item in ctx.cfg.collect.record:
        is_kind = item in (*LAYER_KINDS, "all")
        chosen.update(layer.name for layer in ctx.registry.select(item if is_kind else [item]))
    return [layer for layer in ctx.registry if layer.name in chosen]


def collect_provenance(ctx: RunContext) -> Provenance:
    cfg = ctx.cfg
    return Provenance(
        stage="collect",
        model=cfg.model.name,
        concept=cfg.concept.name,
        fingerprint=fingerprint(
            model={k: v for k, v in cfg.model.items() if k not in ("device",)},
            concept=cfg.concept,
            clip=cfg.clip.model,
            clip_pretrained=cfg.clip.pretrained,
            labeler=cfg.labeler.min_confidence,
            n_images=cfg.collect.n_images,
            batch_size=cfg.collect.batch_size,
            record=cfg.collect.record,
            seed=cfg.seed,
        ),
    )


def collect(ctx: RunContext) -> ActivationStore:
    cfg = ctx.cfg
    plan = sample_plan(ctx.concept.neutral_prompts, cfg.collect.n_images, cfg.seed)
    provenance = collect_provenance(ctx)
    root = ctx.artefact_dir(provenance)
    if ActivationStore.is_complete(root):
        log.info("collect: reusing the complete store at %s", root)
        return ActivationStore(root, expect=provenance)

    layers = recorded_layers(ctx)
    writer = StoreWriter(root, provenance, layers, n_total=len(plan))
    done = writer.done()
    batch_size = int(cfg.collect.batch_size)
    starts = [s for s in range(0, len(plan), batch_size) if s not in done]
    if done:
        log.info("collect: resuming, %d of %d samples already on disk", len(done), len(plan))
    images_dir = root / "images"
    for start in tqdm(starts, desc="collect", unit="batch"):
        rows = plan.iloc[start : start + batch_size]
        images, activations = generate(ctx, list(rows["prompt"]), list(rows["seed"]),
                                       record=[layer.name for layer in layers])
        labels = ctx.labeler(images)
        paths = save_images(images, rows["index"], images_dir, root)
        writer.write_shard(start, activations, labelled_table(rows, labels, paths))
    store = writer.finalize()
    log.info("collect: %d samples x %d layers x %d steps in %s",
             len(store), len(layers), store.n_steps, root)
    return store


def save_images(images: list, indices: pd.Series, directory: Path, root: Path) -> list[str]:
    """Write `<index>.png` per image into `directory`; return the paths relative to `root`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, index in zip(images, indices, strict=True):
        path = directory / f"{index:06d}.png"
        image.save(path)
        paths.append(str(path.relative_to(root)))
    return paths


def labelled_table(rows: pd.DataFrame, labels: Labels, paths: list[str]) -> pd.DataFrame:
    """`rows` with each image's label, path and class probabilities (`p_<class>`)."""
    table = rows.reset_index(drop=True).assign(label=labels.labels, image=paths)
    for k, name in enumerate(labels.classes):
        table[f"p_{name}"] = labels.probs[:, k]
    return table
