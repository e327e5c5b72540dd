"""The activation store: one float16 array per layer, `[N, steps, width]`, plus a sample table.

Collection writes each activation byte once. The first batch preallocates every layer's array at
its final shape (sparse on disk, under the artefact's lock, so concurrent jobs create them once);
each batch then writes its rows in place, lock-free (jobs write disjoint rows), flushes them to
disk, and only then writes its marker: its sample rows, under a temporary name renamed into
place. A batch counts as done once its marker exists, so a run killed at any point resumes from
the markers it finds, regenerating (and overwriting) any batch without one, with no sample lost or
duplicated. `finalize` reads no activation: it gathers the sample rows, renames the arrays to
their final names and writes `meta.json`, which, written last, marks a complete store.

    <artefact>/
      provenance.json         stamped by the first writer
      store/
        meta.json             provenance, layers, steps, N (written last)
        samples.parquet       one row per image
        <layer>.npy           float16 [N, steps, width]; `.<layer>.npy.partial` until complete
      batches/                removed once the store is complete
        arrays.json           n_steps; written once the arrays exist
        <start>-<end>.parquet a batch's sample rows: its activations are on disk
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

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
    """Writes a store batch by batch into preallocated arrays, and resumes from the batches
    already marked done."""

    def __init__(self, root: Path, provenance: Provenance, layers: list[LayerInfo], n_total: int):
        self.root, self.provenance = Path(root), provenance
        self.layers, self.n_total = layers, n_total
        self.out, self.batches = self.root / "store", self.root / "batches"
        self.batches.mkdir(parents=True, exist_ok=True)
        with artefact_lock(self.root):
            stamp = self.root / "provenance.json"
            if stamp.exists():
                provenance.check(read_json(stamp), self.root)
            else:
                write_json_atomic(stamp, asdict(provenance))
            tidy(self.root)

    def _markers(self) -> Iterator[tuple[int, int, Path]]:
        # Temporaries (dot names) and arrays.json don't match; an absent folder (finalized
        # meanwhile) yields nothing.
        for path in sorted(self.batches.glob("[0-9]*-[0-9]*.parquet")):
            start, end = (int(x) for x in path.stem.split("-"))
            yield start, end, path

    def _partial(self, layer: LayerInfo) -> Path:
        return self.out / f".{layer.name}.npy.partial"

    def done(self) -> set[int]:
        """Indices of the samples already written."""
        return {i for start, end, _ in self._markers() for i in range(start, end)}

    def _open_arrays(self, n_steps: int) -> list[np.memmap] | None:
        """Every layer's array, writable in place; None once the store is complete. Whichever
        job writes first creates them at their final shape (sparse files: nothing written but
        the header); `arrays.json`, written last, says they all exist, so arrays of a job
        killed while creating them are created afresh."""
        layout = self.batches / "arrays.json"
        if not layout.exists():
            with artefact_lock(self.root):
                if ActivationStore.is_complete(self.root):  # completed while this job waited
                    return None
                if not layout.exists():  # else another job created them meanwhile
                    self.out.mkdir(exist_ok=True)
                    for layer in self.layers:
                        np.lib.format.open_memmap(
                            self._partial(layer), mode="w+", dtype=np.float16,
                            shape=(self.n_total, n_steps, layer.width))
                    write_json_atomic(layout, {"n_steps": n_steps})
        try:  # np.load reads the header only
            return [np.load(self._partial(layer), mmap_mode="r+") for layer in self.layers]
        except FileNotFoundError:
            if ActivationStore.is_complete(self.root):  # renamed into place meanwhile
                return None
            raise

    def write_batch(self, start: int, activations: dict[str, np.ndarray],
                    samples: pd.DataFrame) -> None:
        """Write the batch's rows in place without the lock (concurrent jobs write disjoint rows
        of the same files), flush them to disk, then mark the batch done under the lock: a
        marker never exists for rows not on disk, and a batch without one is written again."""
        end = start + len(samples)
        marker = self.batches / f"{start:07d}-{end:07d}.parquet"
        if ActivationStore.is_complete(self.root) or marker.exists():
            return  # merged meanwhile, or another job wrote this same batch
        arrays = self._open_arrays(activations[self.layers[0].name].shape[1])
        if arrays is None:
            return
        for layer, array in zip(self.layers, arrays, strict=True):
            block = activations[layer.name]
            if block.shape != array[start:end].shape:  # assignment would broadcast
                raise StoreError(f"cannot write {self.root}: layer {layer.name} of batch "
                                 f"{start}-{end} has shape {block.shape}, the store expects "
                                 f"{array[start:end].shape}")
            array[start:end] = block
        for array in arrays:
            array.flush()  # msync: durable before the marker says so
        with artefact_lock(self.root):
            if ActivationStore.is_complete(self.root):
                return
            # Written under the lock, like every temporary here, so `tidy` can tell a dead
            # job's leftovers from a live job's work in progress.
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
            samples.to_parquet(tmp, index=False)
            os.replace(tmp, marker)

    def finalize(self) -> ActivationStore:
        """Mark the store complete, reading no activation: gather the sample rows, rename the
        arrays into place, write meta.json. Idempotent if interrupted. The caller holds the
        artefact's lock."""
        markers = list(self._markers())
        covered = sorted(i for start, end, _ in markers for i in range(start, end))
        if covered != list(range(self.n_total)):
            raise StoreError(
                f"cannot finalize {self.root}: batches cover {len(covered)} of {self.n_total} "
                "samples (or overlap)"
            )
        frames = [pd.read_parquet(path) for _, _, path in markers]
        samples = pd.concat(frames, ignore_index=True).sort_values("index", ignore_index=True)
        samples.to_parquet(self.out / "samples.parquet", index=False)
        for layer in self.layers:
            if self._partial(layer).exists():  # else renamed by an interrupted finalize
                os.replace(self._partial(layer), self.out / f"{layer.name}.npy")
        write_json_atomic(self.out / "meta.json", {
            "provenance": asdict(self.provenance),
            "layers": [asdict(layer) for layer in self.layers],
            "n_steps": read_json(self.batches / "arrays.json")["n_steps"],
            "n_samples": self.n_total,
            "dtype": "float16",
        })
        tidy(self.root)
        return ActivationStore(self.root, expect=self.provenance)


def tidy(root: Path) -> None:
    """Remove what killed jobs left behind. The caller holds the artefact's lock, under which
    every temporary file of a store is written, so any found now is a dead job's (whatever its
    host); once the store is complete, its batch markers (and an older layout's shards) are
    spent too."""
    root = Path(root)
    leftovers = [*root.glob(".*.tmp"), *root.glob("*/.*.tmp")]
    if ActivationStore.is_complete(root):
        leftovers += [root / "batches", root / "shards"]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def io_per_byte_stored(make_store: Callable[[], ActivationStore]) -> dict[str, float]:
    """This process's I/O while `make_store()` runs (e.g. a fresh collect), per byte of the
    store it returns (its `store/` folder; `stored_bytes`), from Linux's /proc/self/io:
    `write_bytes` and `read_bytes` count what reached the storage layer (memory-mapped writes
    included, in whole pages; nothing on tmpfs; page-cache hits are not reads), `wchar` and
    `rchar` only bytes passed to write and read calls. `images` is the space the images beside
    the store take on disk, which `write_bytes` includes: the store's own writes are
    `write_bytes - images`, about 1.0 since collect writes each activation byte once."""
    def counters() -> dict[str, int]:
        lines = Path("/proc/self/io").read_text().splitlines()
        return {key: int(value) for key, value in (line.split(": ") for line in lines)}

    before = counters()
    store = make_store()
    after = counters()
    stored = sum(path.stat().st_size for path in (store.root / "store").iterdir())
    images = sum(path.stat().st_blocks * 512 for path in store.root.glob("images/*"))
    delta = {key: (after[key] - before[key]) / stored
             for key in ("write_bytes", "read_bytes", "wchar", "rchar")}
    return {"stored_bytes": stored, **delta, "images": images / stored}
