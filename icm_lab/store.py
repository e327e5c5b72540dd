"""The activation store: one float16 array per layer, `[N, steps, width]`, plus a sample table.

Collection writes one shard per batch: a folder with the batch's activations (safetensors) and
sample rows (parquet), written under a temporary name and renamed into place, so a shard either
exists whole or not at all. A run killed at any point resumes from the shards it finds, with no
sample lost or duplicated. `finalize` then packs the shards into one `.npy` per layer, which
probing memory-maps and so reads once. `meta.json`, written last, marks a complete store.

    store/
      meta.json            provenance, layers, steps, N (written last)
      samples.parquet      one row per image
      <layer>.npy          float16 [N, steps, width]
    shards/<start>-<end>/  activations.safetensors + samples.parquet (removed after finalize)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from icm_lab.artefacts import Provenance, artefact_lock, read_json, write_json_atomic
from icm_lab.errors import UserError
from icm_lab.models.layers import LayerInfo


class StoreError(UserError, RuntimeError):
    pass


class ActivationStore:
    """A complete store on disk. Arrays are memory-mapped, never loaded whole by default."""

    def __init__(self, root: Path, expect: Provenance | None = None):
        self.root = Path(root)
        meta_path = self.root / "store" / "meta.json"
        if not meta_path.exists():
            raise StoreError(f"no complete activation store at {self.root} (no store/meta.json)")
        self.meta = read_json(meta_path)
        if expect is not None:
            expect.check(self.meta["provenance"], self.root)
        self.layers = [LayerInfo(**layer) for layer in self.meta["layers"]]
        self.n_steps: int = self.meta["n_steps"]
        self.samples = pd.read_parquet(self.root / "store" / "samples.parquet")

    @staticmethod
    def is_complete(root: Path) -> bool:
        return (Path(root) / "store" / "meta.json").exists()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, layer: str) -> np.ndarray:
        names = [info.name for info in self.layers]
        if layer not in names:
            raise KeyError(f"layer {layer!r} was not recorded in {self.root}; recorded: {names}")
        return np.load(self.root / "store" / f"{layer}.npy", mmap_mode="r")


class StoreWriter:
    """Writes a store shard by shard, and resumes from the shards already on disk."""

    def __init__(self, root: Path, provenance: Provenance, layers: list[LayerInfo], n_total: int):
        self.root, self.provenance = Path(root), provenance
        self.layers, self.n_total = layers, n_total
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        stamp = self.root / "provenance.json"
        if stamp.exists():
            provenance.check(read_json(stamp), self.root)
        else:
            write_json_atomic(stamp, asdict(provenance))

    def _shard_dirs(self) -> Iterator[tuple[int, int, Path]]:
        if not self.shards.is_dir():  # finalized meanwhile
            return
        for path in sorted(self.shards.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                start, end = (int(x) for x in path.name.split("-"))
                yield start, end, path

    def done(self) -> set[int]:
        """Indices of the samples already written."""
        return {i for start, end, _ in self._shard_dirs() for i in range(start, end)}

    def write_shard(self, start: int, activations: dict[str, np.ndarray], samples: pd.DataFrame):
        """Written beside the store, then renamed into shards/ under the artefact's lock, so
        concurrent shard jobs and a finalizing job never see half a shard."""
        end = start + len(samples)
        final = self.shards / f"{start:07d}-{end:07d}"
        tmp = self.root / f".shard-{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in activations.items()},
                  tmp / "activations.safetensors")
        samples.to_parquet(tmp / "samples.parquet", index=False)
        with artefact_lock(self.root):
            if ActivationStore.is_complete(self.root) or final.is_dir():
                shutil.rmtree(tmp)  # merged meanwhile, or another job wrote this same shard
            else:
                os.replace(tmp, final)

    def finalize(self) -> ActivationStore:
        """Pack the shards into one array per layer; idempotent if interrupted. The caller
        holds the artefact's lock."""
        shards = list(self._shard_dirs())
        covered = sorted(i for start, end, _ in shards for i in range(start, end))
        if covered != list(range(self.n_total)):
            raise StoreError(
                f"cannot finalize {self.root}: shards cover {len(covered)} of {self.n_total} "
                "samples (or overlap)"
            )
        out = self.root / "store"
        out.mkdir(exist_ok=True)
        n_steps = None
        arrays: dict[str, np.ndarray] = {}
        frames = []
        for start, end, path in shards:
            tensors = load_file(path / "activations.safetensors")
            for layer in self.layers:
                block = tensors[layer.name]
                if layer.name not in arrays:
                    n_steps = block.shape[1]
                    arrays[layer.name] = np.lib.format.open_memmap(
                        out / f".{layer.name}.npy.tmp", mode="w+", dtype=np.float16,
                        shape=(self.n_total, n_steps, layer.width),
                    )
                arrays[layer.name][start:end] = block
            frames.append(pd.read_parquet(path / "samples.parquet"))
        for name, array in arrays.items():
            array.flush()
            os.replace(out / f".{name}.npy.tmp", out / f"{name}.npy")
        samples = pd.concat(frames, ignore_index=True).sort_values("index", ignore_index=True)
        samples.to_parquet(out / "samples.parquet", index=False)
        write_json_atomic(out / "meta.json", {
            "provenance": asdict(self.provenance),
            "layers": [asdict(layer) for layer in self.layers],
            "n_steps": n_steps,
            "n_samples": self.n_total,
            "dtype": "float16",
        })
        shutil.rmtree(self.shards)
        return ActivationStore(self.root, expect=self.provenance)
