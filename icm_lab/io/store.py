"""The activation store: one float16 array per layer, `[N, steps, width]`, plus a sample table.

Collection writes each activation byte once. The first batch preallocates every layer's array at
its final shape (sparse on disk, under the artefact's lock, so concurrent jobs create them once);
each batch then writes its rows in place, lock-free (jobs write disjoint rows), flushes them to
disk, and only then writes its marker: its sample rows, under a temporary name renamed into
place. A batch counts as done once its marker exists, so a run killed at any point resumes from
the markers it finds, regenerating (and overwriting) any batch without one, with no sample lost or
duplicated. `finalize` gathers the sample rows, renames the arrays to their final names, writes
`meta.json`, and seals the store (`artefacts.seal`: its manifest, written last, marks it
complete). Arrays are allocated on disk when created, so a full disk is found then, with one
line, and never later as a crash while writing into a memory map.

    <artefact>/
      provenance.json         stamped by the first writer
      store/
        meta.json             provenance, layers, steps, N
        samples.parquet       one row per image
        <layer>.npy           float16 [N, steps, width]; `.<layer>.npy.partial` until complete
      batches/                removed once the store is complete
        arrays.json           n_steps and each array's header; written once the arrays exist
        <start>-<end>.parquet a batch's sample rows and the digest of each row of each layer
                              written: its activations are on disk
      manifest.json           every file's size and hash, written last: the store is complete
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from icm_lab.core.errors import UserError
from icm_lab.core.layers import LayerInfo
from icm_lab.io.artefacts import (
    Provenance,
    artefact_lock,
    is_sealed,
    npy_digest,
    npy_header,
    read_json,
    row_digests,
    seal,
)
from icm_lab.io.files import disk_full, remove_dead_temporaries, write_json, write_table

DIGESTS = "_digests"  # a marker's column: each sample's row digests, layer by layer


class StoreError(UserError, RuntimeError):
    pass


class ActivationStore:
    """A complete store on disk. Arrays are memory-mapped, never loaded whole by default."""

    def __init__(self, root: Path, expect: Provenance | None = None):
        self.root = Path(root)
        meta_path = self.root / "store" / "meta.json"
        if not meta_path.exists():
            raise StoreError(f"no activation store at {self.root} (no store/meta.json)")
        self.meta = read_json(meta_path)
        if expect is not None:
            expect.check(self.meta["provenance"], self.root)
        self.layers = [LayerInfo(**layer) for layer in self.meta["layers"]]
        self.n_steps: int = self.meta["n_steps"]
        self.samples = pd.read_parquet(self.root / "store" / "samples.parquet")

    @staticmethod
    def is_complete(root: Path) -> bool:
        return is_sealed(root)

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
                write_json(stamp, asdict(provenance))
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
                        self._allocate(layer, n_steps)
                    write_json(layout, {"n_steps": n_steps, "headers": {
                        layer.name: npy_header(self._partial(layer)).hex()
                        for layer in self.layers}})
        try:  # np.load reads the header only
            return [np.load(self._partial(layer), mmap_mode="r+") for layer in self.layers]
        except FileNotFoundError:
            if ActivationStore.is_complete(self.root):  # renamed into place meanwhile
                return None
            raise

    def _allocate(self, layer: LayerInfo, n_steps: int) -> None:
        """The layer's array at its final shape, its blocks reserved on disk: a full disk stops
        the run here with one line, not later with SIGBUS inside a memory-mapped write."""
        array = np.lib.format.open_memmap(self._partial(layer), mode="w+", dtype=np.float16,
                                          shape=(self.n_total, n_steps, layer.width))
        del array
        with open(self._partial(layer), "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise disk_full(self._partial(layer)) from error
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no such reservation
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
        digests = []
        for layer, array in zip(self.layers, arrays, strict=True):
            block = activations[layer.name]
            if block.shape != array[start:end].shape:  # assignment would broadcast
                raise StoreError(f"cannot write {self.root}: layer {layer.name} of batch "
                                 f"{start}-{end} has shape {block.shape}, the store expects "
                                 f"{array[start:end].shape}")
            array[start:end] = block
            digests.append(row_digests(array[start:end]))  # so sealing reads no activation
        samples = samples.assign(**{DIGESTS: [b"".join(row) for row in zip(*digests, strict=True)]})
        for array in arrays:
            _flush_rows(array, start, end, last=end == self.n_total)
        with artefact_lock(self.root):
            if ActivationStore.is_complete(self.root):
                return
            write_table(samples, marker)

    def finalize(self) -> ActivationStore:
        """Mark the store complete, reading no activation: gather the sample rows, rename the
        arrays into place, write meta.json, seal it (the arrays' digests come from the batch
        markers). Idempotent if interrupted. The caller holds the artefact's lock."""
        markers = list(self._markers())
        covered = sorted(i for start, end, _ in markers for i in range(start, end))
        if covered != list(range(self.n_total)):
            raise StoreError(
                f"cannot finalize {self.root}: batches cover {len(covered)} of {self.n_total} "
                "samples (or overlap)"
            )
        frames = [pd.read_parquet(path) for _, _, path in markers]
        samples = pd.concat(frames, ignore_index=True).sort_values("index", ignore_index=True)
        arrays = read_json(self.batches / "arrays.json")
        size = len(samples[DIGESTS].iloc[0]) // len(self.layers)
        digests = {f"store/{layer.name}.npy": npy_digest(
            bytes.fromhex(arrays["headers"][layer.name]),
            [row[i * size : (i + 1) * size] for row in samples[DIGESTS]])
            for i, layer in enumerate(self.layers)}
        samples = samples.drop(columns=[DIGESTS])
        write_table(samples, self.out / "samples.parquet")
        for layer in self.layers:
            if self._partial(layer).exists():  # else renamed by an interrupted finalize
                os.replace(self._partial(layer), self.out / f"{layer.name}.npy")
        write_json(self.out / "meta.json", {
            "provenance": asdict(self.provenance),
            "layers": [asdict(layer) for layer in self.layers],
            "n_steps": arrays["n_steps"],
            "n_samples": self.n_total,
            "dtype": "float16",
        })
        seal(self.root, skip=("batches",), known=digests)
        tidy(self.root)
        return ActivationStore(self.root, expect=self.provenance)


def _flush_rows(array: np.memmap, start: int, end: int, last: bool) -> None:
    """msync the pages holding rows `[start, end)`, durable before the batch's marker says so,
    but for a last page that the next rows share (unless these are the last rows): the batch
    writing those flushes it, so each page reaches the disk once, not once per batch (about
    3 % more writes on the toy store). Kill -9 loses nothing either way (the page cache keeps
    the rows); only a power cut could lose that one page's rows before the next batch."""
    page, mapped = mmap.PAGESIZE, array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    begin = array.offset - mapped + start * array.strides[0]
    stop = array.offset - mapped + end * array.strides[0]
    first = begin - begin % page
    stop = stop if last else stop - stop % page
    if stop > first:
        mapping = array.base  # the file's mmap.mmap, which np.memmap maps the array onto
        if not isinstance(mapping, mmap.mmap):
            raise TypeError(f"expected an array mapped from a file, got base {type(mapping)}")
        mapping.flush(first, stop - first)


def tidy(root: Path) -> None:
    """Remove what killed jobs left behind: temporaries whose owner is gone, and once the store
    is complete, its batch markers."""
    root = Path(root)
    remove_dead_temporaries(root)
    if ActivationStore.is_complete(root):
        shutil.rmtree(root / "batches", ignore_errors=True)
