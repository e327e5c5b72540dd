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
from omegaconf import DictConfig
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
            labeler=cfg.labeler,
            n_images=cfg.collect.n_images,
            batch_size=cfg.collect.batch_size,
            record=cfg.collect.record,
            seed=cfg.seed,
        ),
    )


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """(`collect.shard`, `collect.num_shards`), checked."""
    shard, n = cfg.collect.shard, cfg.collect.num_shards
    if not isinstance(n, int) or n < 1 or not isinstance(shard, int) or not 0 <= shard < n:
        raise ValueError(f"collect.shard={shard!r} must be an integer in [0, collect.num_shards) "
                         f"and collect.num_shards={n!r} a positive integer")
    return shard, n


def collect(ctx: RunContext) -> ActivationStore | None:
    """The store. Unsharded, one job writes it (others wanting it wait on its lock). With
    `collect.num_shards=n`, job `collect.shard=i` writes batches i, i+n, ... into the same
    store without a lock, and whichever job finds every batch on disk merges them; a store
    merged from shards equals the unsharded one, since a sample depends only on (seed, index).
    Returns None from a shard job while other shards are still missing."""
    cfg = ctx.cfg
    shard, num_shards = shard_of(cfg)
    provenance = collect_provenance(ctx)
    root = ctx.artefact_dir(provenance)
    collection = None
    if num_shards > 1 and not ActivationStore.is_complete(root):
        # Disjoint batches, each renamed into place whole: no lock held while generating.
        collection = ShardedCollection(ctx, provenance, root)
        collection.write(shard, num_shards)
    with ctx.artefact(provenance) as root:
        if ActivationStore.is_complete(root):
            log.info("collect: reusing the complete store at %s", root)
            return ActivationStore(root, expect=provenance)
        collection = collection or ShardedCollection(ctx, provenance, root)
        if num_shards == 1:
            collection.write(0, 1)
        missing = collection.writer.n_total - len(collection.writer.done())
        if missing:
            log.info("collect: shard %d/%d written; %d samples await other shards (rerun "
                     "without collect.num_shards to finish and merge)", shard, num_shards, missing)
            if list(cfg.stages)[-1] != "collect":
                raise ValueError(f"collect is sharded and {missing} samples are missing, so "
                                 f"later stages cannot run; use stages=[collect] for shard jobs")
            return None
        store = collection.writer.finalize()
    log.info("collect: %d samples x %d layers x %d steps in %s",
             len(store), len(store.layers), store.n_steps, root)
    return store


class ShardedCollection:
    """The sample plan, split into batches, and the writer of one store."""

    def __init__(self, ctx: RunContext, provenance: Provenance, root: Path):
        cfg = ctx.cfg
        self.ctx, self.root = ctx, root
        self.plan = sample_plan(ctx.concept.neutral_prompts, cfg.collect.n_images, cfg.seed)
        self.layers = recorded_layers(ctx)
        self.writer = StoreWriter(root, provenance, self.layers, n_total=len(self.plan))
        self.batch_size = int(cfg.collect.batch_size)

    def write(self, shard: int, num_shards: int) -> None:
        """Generate and write batches shard, shard + num_shards, ... not yet on disk."""
        done = self.writer.done()
        starts = list(range(0, len(self.plan), self.batch_size))[shard::num_shards]
        starts = [s for s in starts if s not in done]
        if done and starts:
            log.info("collect: resuming, %d of %d samples on disk", len(done), len(self.plan))
        for start in tqdm(starts, desc="collect", unit="batch"):
            if ActivationStore.is_complete(self.root):
                return  # another job merged the store meanwhile
            rows = self.plan.iloc[start : start + self.batch_size]
            images, activations = generate(self.ctx, list(rows["prompt"]), list(rows["seed"]),
                                           record=[layer.name for layer in self.layers])
            paths = save_images(images, rows["index"], self.root / "images", self.root)
            self.writer.write_shard(start, activations,
                                    labelled_table(rows, self.ctx.labeler(images), paths))


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
