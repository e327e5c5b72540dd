"""Artefacts survive what happens to files: damage is found and repaired, every write is atomic
and group-readable, a full disk ends a run cleanly, and a job killed at any write resumes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import icm_lab.probing.probeset
from icm_lab.app.runner import run
from icm_lab.core.errors import UserError
from icm_lab.engine.generation import Prefix
from icm_lab.io import files
from icm_lab.io.artefacts import damage, seal
from icm_lab.io.files import DiskFullError, atomic, write_image, write_json, write_table
from icm_lab.probing.probeset import ProbeSet
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["collect.n_images=12", "collect.batch_size=4", "model.steps=4",
         "eval.n_images_per_prompt=2", "localize.folds=2", "layers.rank_by=separability"]
KINDS = {".npy", ".safetensors", ".parquet", ".json", ".png"}


def sealed_artefact(root: Path) -> dict[str, Path]:
    """One file of every kind the project writes, through its writers, sealed."""
    paths = {suffix: root / f"file{suffix}" for suffix in KINDS}
    np.save(paths[".npy"], np.arange(600, dtype=np.float16).reshape(20, 30))
    with atomic(paths[".safetensors"]) as tmp:
        save_file({"x": torch.arange(300.0)}, tmp)
    write_table(pd.DataFrame({"a": range(100)}), paths[".parquet"])
    write_json(paths[".json"], {"a": list(range(50))})
    write_image(Image.fromarray(np.arange(3072, dtype=np.uint8).reshape(32, 32, 3)),
                paths[".png"])
    seal(root)
    return paths


@pytest.mark.parametrize("suffix", sorted(KINDS))
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_damage_names_each_damaged_file(tmp_path, suffix, how):
    paths = sealed_artefact(tmp_path)
    assert damage(tmp_path, hashes=True) == []
    path = paths[suffix]
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif how == "delete":
        path.unlink()
    else:  # same size: only the hash can tell, so it needs paths.verify=hashes
        position = len(data) // 2
        path.write_bytes(data[:position] + bytes([data[position] ^ 0x55]) + data[position + 1:])
        assert damage(tmp_path) == [] or suffix in {".json"}  # (JSON may stop parsing)
    (found,) = damage(tmp_path, hashes=True)
    assert found.startswith(f"{path}: ")


def test_a_header_that_disagrees_with_the_size_is_damage(tmp_path):
    """A file cut short and resealed (sizes agree) is still caught by its header."""
    paths = sealed_artefact(tmp_path)
    for suffix in (".npy", ".safetensors", ".parquet", ".png"):
        paths[suffix].write_bytes(paths[suffix].read_bytes()[:-9])
    seal(tmp_path)
    found = damage(tmp_path)
    assert sorted(line.split(": ")[0] for line in found) == sorted(
        str(paths[s]) for s in (".npy", ".safetensors", ".parquet", ".png"))


def run_stages(root: Path, *overrides: str) -> dict:
    return run(make_config(*SMALL, f"paths.root={root}", *overrides), root / "run")


def test_a_damaged_artefact_is_moved_aside_and_computed_again(tmp_path, caplog):
    first = run_stages(tmp_path, "stages=[collect,localize]")
    store, probes = first["collect"].root, first["localize"].probes.root
    array = next((store / "store").glob("*.npy"))
    original = array.read_bytes()
    array.write_bytes(original[:-100])
    (probes / "probes.safetensors").write_bytes(b"")

    second = run_stages(tmp_path, "stages=[collect,localize]")
    assert f"{array}: " in caplog.text and "damaged" in caplog.text
    assert second["collect"].root == store and array.read_bytes() == original
    assert len(list(store.parent.glob(f"{store.name}.damaged-*"))) == 1
    assert damage(store, hashes=True) == [] and damage(probes, hashes=True) == []
    first_layer = ProbeSet(probes).layers[0]
    assert ProbeSet(probes).directions(first_layer, "probe").isfinite().all()


def test_hash_verification_finds_a_flipped_byte_only_when_asked(tmp_path, caplog):
    first = run_stages(tmp_path, "stages=[collect]")
    array = next((first["collect"].root / "store").glob("*.npy"))
    data = bytearray(array.read_bytes())
    data[-3] ^= 0x01
    array.write_bytes(bytes(data))
    run_stages(tmp_path, "stages=[collect]")
    assert "damaged" not in caplog.text  # sizes and headers agree
    run_stages(tmp_path, "stages=[collect]", "paths.verify=hashes")
    assert "content differs" in caplog.text


def test_probes_from_a_damaged_probe_set_are_refused_in_one_line(tmp_path):
    probes = run_stages(tmp_path, "stages=[collect,localize]")["localize"].probes.root
    (probes / "scores.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=f"{probes}.*scores.parquet.*localize again"):
        ProbeSet(probes)


def test_a_damaged_prefix_is_deleted_and_recomputed(tmp_path, caplog):
    prefix = Prefix(tmp_path, step=2)
    latents = torch.randn(2, 4, 8, 8)
    prefix.save(0, 2, latents)
    assert torch.equal(prefix.load(0, 2), latents)
    assert (tmp_path / "0000000-0000002.safetensors").stat().st_mode & 0o777 == files.FILE_MODE
    path = prefix.path(0, 2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    assert prefix.load(0, 2) is None and not path.exists() and "damaged" in caplog.text
    prefix.save(0, 2, latents)
    path.write_bytes(path.read_bytes()[:-5])
    assert prefix.load(0, 2) is None


def test_every_file_is_group_readable_and_no_temporary_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        run_stages(tmp_path, "stages=[collect,localize,steer,evaluate]")
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "outputs").rglob("*") if not p.is_symlink()]
    assert any(p.name == "probes.safetensors" for p in written)
    assert any(p.suffix == ".png" for p in written)
    for path in written + [tmp_path / "run" / "steer"]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_full_disk_ends_the_run_in_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    run_stages(tmp_path, "stages=[collect]")

    def full(tensors, path, **kwargs):  # what the Rust writer raises on ENOSPC
        Path(path).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(icm_lab.probing.probeset, "save_file", full)
    with pytest.raises(DiskFullError, match=r"disk is full: could not write .*probes\.safe"):
        run_stages(tmp_path, "stages=[collect,localize]")
    (probes,) = [p for p in (tmp_path / "outputs/artefacts/localize").iterdir() if p.is_dir()]
    assert not (probes / "manifest.json").exists() and not list(probes.glob(".*.tmp"))
    monkeypatch.undo()
    result = run_stages(tmp_path, "stages=[collect,localize]")
    assert result["localize"].probes.root == probes and damage(probes, hashes=True) == []


def test_a_full_disk_when_allocating_the_store_is_one_line(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"could not write .*\.npy\.partial"):
        run_stages(tmp_path, "stages=[collect]")
    monkeypatch.undo()
    assert len(run_stages(tmp_path, "stages=[collect]")["collect"]) == 12


# -- kill -9 at the worst moment of a write, in every stage ----------------------------------

KILL_POINTS = [
    "*/artefacts/collect/*/images/000005.png",  # collect, writing images
    "*/artefacts/collect/*/store/samples.parquet",  # the store's finalisation
    "*/artefacts/collect/*/manifest.json",  # sealing it
    "*/artefacts/localize/*/probes.safetensors",  # localize, writing probes
    "*/artefacts/base/*/images/000001.png",  # steer, the unsteered images
    "*/steer/images.parquet",  # steer, its table
    "*/metrics.json",  # evaluate
]


def cli(root: Path, name: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """`python -m icm_lab`, or with `kill`, the same run through tests/kill_at_write.py, which
    dies (SIGKILL) when a file matching that pattern is written but not yet renamed into place."""
    args = ["model=tiny_sd15", "concept=gender", *SMALL, f"paths.root={root}",
            f"hydra.run.dir={root}/runs/{name}"]
    start = [str(ROOT / "tests" / "kill_at_write.py"), kill] if kill else ["-m", "icm_lab"]
    return subprocess.run([sys.executable, *start, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def snapshot(root: Path, run: str) -> dict[str, bytes]:
    """Every artefact file and the run's steered images and metrics, by a run-free name."""
    found = {str(p.relative_to(root / "outputs")): p.read_bytes()
             for p in (root / "outputs" / "artefacts").rglob("*")
             if p.is_file() and p.suffix != ".lock"}
    steered = root / "runs" / run / "steer" / "images"
    found |= {f"steer/{p.name}": p.read_bytes() for p in steered.glob("*.png")}
    metrics = json.loads((root / "runs" / run / "metrics.json").read_text())
    found["metrics"] = json.dumps({k: metrics[k] for k in ("base", "steered")}).encode()
    return found


@pytest.mark.slow
def test_a_run_killed_at_any_write_resumes_to_the_same_bytes(tmp_path):
    """One run killed at each point in turn, each rerun resuming the last and dying further on,
    then one to the end: what it leaves equals a clean run's, byte for byte."""
    clean = cli(tmp_path / "clean", "only")
    assert clean.returncode == 0, clean.stderr[-3000:]
    root = tmp_path / "killed"
    for i, point in enumerate(KILL_POINTS):
        killed = cli(root, f"try{i}", kill=point)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
    resumed = cli(root, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, found = snapshot(tmp_path / "clean", "only"), snapshot(root, "resumed")
    assert sorted(found) == sorted(reference)
    assert [name for name in reference if found[name] != reference[name]] == []
    assert not list(root.glob("outputs/**/.*.tmp"))
