"""Collect: generate images from the neutral prompts, record every chosen layer at every step,
label each image, and write the activation store (`sampling.sample_plan` says which prompt and
seed each sample uses)."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from icm_lab.config.schema import CollectConfig
from icm_lab.core.errors import UserError
from icm_lab.io.artefacts import Provenance, fingerprint
from icm_lab.io.store import ActivationStore, StoreWriter, tidy
from icm_lab.labeling.sampling import labelled_table, sample_plan, save_images
from icm_lab.stages.registry import RunState, Stage, register
from icm_lab.stages.resources import Resources

log = logging.getLogger(__name__)


def collect_provenance(res: Resources, cfg: CollectConfig, seed: int) -> Provenance:
    return Provenance(
        stage="collect",
        model=res.model.name,
        concept=res.concept.name,
        fingerprint=fingerprint(
            model=res.model_identity(),
            concept=res.concept_identity(),
            **res.labelling_identity(),
            n_images=cfg.n_images,
            batch_size=cfg.batch_size,
            record=cfg.record,
            seed=seed,
        ),
    )


def collect(res: Resources, cfg: CollectConfig, seed: int) -> ActivationStore | None:
    """The store. Unsharded, one job writes it (others wanting it wait on its lock). With
    `collect.num_shards=n`, job `collect.shard=i` writes batches i, i+n, ... into the same
    preallocated arrays without the lock, and whichever job finds every batch on disk marks the
    store complete; a store merged from shards equals the unsharded one, since a sample depends
    only on (seed, index). Returns None from a shard job while other batches are missing."""
    provenance = collect_provenance(res, cfg, seed)
    root = res.artefact_dir(provenance)
    collection = None
    if cfg.num_shards > 1:
        with res.artefact(provenance):
            complete = res.reusable(root)  # a damaged store is moved aside: written afresh
        if not complete:
            # Disjoint batches, each marked done once on disk: no lock held while generating.
            collection = ShardedCollection(res, cfg, seed, provenance, root)
            collection.write(cfg.shard, cfg.num_shards)
    with res.artefact(provenance) as root:
        if res.reusable(root):
            log.info("collect: reusing the complete store at %s", root)
            tidy(root)  # leftovers of a job killed just after completing it
            return ActivationStore(root, expect=provenance)
        collection = collection or ShardedCollection(res, cfg, seed, provenance, root)
        if cfg.num_shards == 1:
            collection.write(0, 1)
        missing = collection.writer.n_total - len(collection.writer.done())
        if missing:
            log.info("collect: shard %d/%d written; %d samples await other shards (rerun "
                     "without collect.num_shards to finish and merge)", cfg.shard,
                     cfg.num_shards, missing)
            return None
        store = collection.writer.finalize()
    log.info("collect: %d samples x %d layers x %d steps in %s",
             len(store), len(store.layers), store.n_steps, root)
    return store


class ShardedCollection:
    """The sample plan, split into batches, and the writer of one store."""

    def __init__(self, res: Resources, cfg: CollectConfig, seed: int, provenance: Provenance,
                 root: Path):
        self.res, self.root = res, root
        self.plan = sample_plan(res.concept.neutral_prompts, cfg.n_images, seed)
        self.layers = res.registry.resolve(cfg.record)
        self.writer = StoreWriter(root, provenance, self.layers, n_total=len(self.plan))
        self.batch_size = cfg.batch_size

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
            if start in self.writer.done():
                continue  # another job (a rerun, or the merging job) wrote it meanwhile
            rows = self.plan.iloc[start : start + self.batch_size]
            images, activations = self.res.generator.batch(
                list(rows["prompt"]), list(rows["seed"]),
                record=[layer.name for layer in self.layers])
            paths = save_images(images, rows["index"], self.root / "images", self.root)
            self.writer.write_batch(start, activations,
                                    labelled_table(rows, self.res.labeler(images), paths))


def run_collect(run: RunState) -> ActivationStore | None:
    store = collect(run.res, run.parts.sections["collect"], run.cfg.seed)
    downstream = [s for s in run.cfg.stages if s != "collect"]
    if store is None and downstream:
        raise UserError(f"collect is sharded and samples are still missing, so {downstream} "
                        "cannot run; use stages=[collect] for shard jobs")
    return store


register(Stage("collect", section="collect", result=ActivationStore, needs=lambda run: (),
               run=run_collect))
