import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icm_lab.app.runner import run
from icm_lab.core.errors import ConfigError
from icm_lab.core.layers import LayerInfo
from icm_lab.io.artefacts import ArtefactMismatchError, Provenance
from icm_lab.io.store import ActivationStore, StoreError, StoreWriter
from icm_lab.labeling.sampling import sample_plan
from icm_lab.tools.bench import io_per_byte_stored
from tests.conftest import dead_pid, make_config, temporary_name

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["collect.n_images=12", "collect.batch_size=2", "model.steps=6", "stages=[collect]"]


def run_collect(tmp_path: Path, *overrides: str):
    cfg = make_config(*SMALL, f"paths.root={tmp_path}", *overrides)
    return run(cfg, tmp_path / "run")["collect"]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "icm_lab", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_collect_writes_store_images_and_table(tmp_path):
    store = run_collect(tmp_path)
    assert len(store) == 12 and store.n_steps == 6
    for layer in store.layers:
        array = store[layer.name]
        assert array.shape == (12, 6, layer.width) and array.dtype == np.float16
        assert np.isfinite(array).all()
    table = store.samples
    assert list(table["index"]) == list(range(12))
    assert {"prompt", "prompt_id", "seed", "label", "image", "p_male", "p_female"} <= set(table)
    assert table["seed"].is_unique
    np.testing.assert_allclose(table[["p_male", "p_female"]].sum(axis=1), 1, rtol=1e-5)
    assert all((store.root / path).exists() for path in table["image"])
    assert (tmp_path / "run" / "collect").resolve() == store.root.resolve()
    assert store.meta["provenance"]["model"] == "tiny_sd15"


@pytest.mark.parametrize("model,concept", [("tiny_sdxl", "age"), ("tiny_sana", "race")])
def test_collect_other_models_and_multiclass_concepts(model, concept, tmp_path):
    store = run_collect(tmp_path, f"model={model}", f"concept={concept}", "collect.n_images=4")
    classes = make_config(f"concept={concept}").concept.classes
    probs = store.samples[[f"p_{k}" for k in classes]]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert set(store.samples["label"]) <= {*classes, "undecided"}
    assert {layer.kind for layer in store.layers} >= {"attn1", "attn2"}
    assert store.meta["provenance"] == {"stage": "collect", "model": model, "concept": concept,
                                        "fingerprint": store.root.name.rsplit("-", 1)[1]}


def test_rerun_reuses_the_store(tmp_path):
    first = run_collect(tmp_path)
    stamp = (first.root / "store" / "meta.json").stat().st_mtime_ns
    second = run_collect(tmp_path)
    assert second.root == first.root
    assert (second.root / "store" / "meta.json").stat().st_mtime_ns == stamp


def test_store_from_another_model_is_refused(tmp_path):
    store = run_collect(tmp_path)
    other = Provenance("collect", "tiny_sdxl", "gender", store.meta["provenance"]["fingerprint"])
    with pytest.raises(ArtefactMismatchError, match="tiny_sd15.*tiny_sdxl"):
        ActivationStore(store.root, expect=other)


@pytest.mark.slow
def test_killed_collection_resumes_to_an_identical_store(tmp_path):
    args = ["model=tiny_sd15", "concept=gender", *SMALL, "collect.n_images=16",
            "hydra.run.dir=" + str(tmp_path / "runs" / "x")]
    reference = run_collect(tmp_path / "reference", "collect.n_images=16")

    killed = tmp_path / "killed"
    process = cli(*args, f"paths.root={killed}")
    batches = None
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = list(killed.glob("outputs/artefacts/collect/*/batches/0*.parquet"))
        if len(found) >= 2:
            process.send_signal(signal.SIGKILL)
            batches = len(found)
            break
        time.sleep(0.01)
    process.wait()
    assert batches is not None, "the run finished before it could be killed"
    (root,) = [p for p in killed.glob("outputs/artefacts/collect/*") if p.is_dir()]
    assert not ActivationStore.is_complete(root)

    done = cli(*args, f"paths.root={killed}")
    output, _ = done.communicate(timeout=600)
    assert done.returncode == 0, output
    assert "resuming" in output
    resumed = ActivationStore(root)
    assert resumed.root.name == reference.root.name  # same fingerprint
    for layer in reference.layers:
        assert np.array_equal(resumed[layer.name], reference[layer.name]), layer.name
    columns = [c for c in reference.samples.columns]
    pd.testing.assert_frame_equal(resumed.samples[columns], reference.samples)


def test_sample_plan_refuses_a_non_integer_count():
    with pytest.raises(ConfigError, match="collect.n_images=2.5 must be a positive integer"):
        sample_plan(("a",), 2.5, 0)


def test_sample_plan_is_independent_of_n():
    small, large = sample_plan(("a", "b", "c"), 4, seed=7), sample_plan(("a", "b", "c"), 9, seed=7)
    pd.testing.assert_frame_equal(small, large.iloc[:4])
    assert list(large["prompt"][:4]) == ["a", "b", "c", "a"]
    assert not sample_plan(("a",), 4, seed=8)["seed"].equals(small["seed"])


# The writer on synthetic batches: 4 batches of 3 samples, two layers.
LAYERS = [LayerInfo(f"layer{i}", "attn1", width=8 * (i + 1), resolution=4, block="up")
          for i in range(2)]
PROVENANCE = Provenance("collect", "tiny_sd15", "gender", "synthetic")


def batch(start: int, size: int = 3, steps: int = 5):
    rng = np.random.default_rng(start)
    activations = {layer.name: rng.normal(size=(size, steps, layer.width)).astype(np.float16)
                   for layer in LAYERS}
    samples = pd.DataFrame({"index": range(start, start + size), "label": "male"})
    return activations, samples


def write(root: Path, starts, **kwargs) -> StoreWriter:
    writer = StoreWriter(root, PROVENANCE, LAYERS, n_total=12)
    for start in starts:
        writer.write_batch(start, *batch(start, **kwargs))
    return writer


def store_files(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((root / "store").iterdir())}


def test_a_killed_writer_resumes_to_the_identical_store(tmp_path):
    reference = write(tmp_path / "reference", [0, 3, 6, 9]).finalize()
    killed = tmp_path / "killed"
    writer = write(killed, [0, 6])
    # Killed between flushing batch 3's rows (garbage here) and writing its marker, and while
    # writing a marker and a stamp: a batch without a marker is written again.
    writer.write_batch(3, {k: v * 0 for k, v in batch(3)[0].items()}, batch(3)[1])
    (killed / "batches" / "0000003-0000006.parquet").unlink()
    gone = dead_pid()
    for leftover in [f"batches/{temporary_name('0000009-0000012.parquet', gone)}",
                     temporary_name("provenance.json", gone)]:
        (killed / leftover).write_text("half")
    (killed / temporary_name("shard-0000000-0000003", gone)).mkdir()
    live = killed / "images" / temporary_name("000004.png", os.getpid())  # a job still writing
    live.parent.mkdir()
    live.write_text("half")
    with pytest.raises(StoreError, match=f"cannot finalize {killed}: batches cover 6 of 12"):
        writer.finalize()

    resumed = StoreWriter(killed, PROVENANCE, LAYERS, n_total=12)
    assert resumed.done() == {*range(3), *range(6, 9)}
    assert list(killed.glob("**/.*.tmp")) == [live]  # only the dead jobs' leftovers go
    live.unlink()
    for start in sorted({0, 3, 6, 9} - resumed.done()):
        resumed.write_batch(start, *batch(start))
    store = resumed.finalize()
    assert store_files(store.root) == store_files(reference.root)  # byte for byte
    assert sorted(p.name for p in killed.iterdir()) == ["images", "manifest.json",
                                                        "provenance.json", "store"]
    assert store.n_steps == 5 and len(store) == 12


def test_finalize_reads_no_activation(tmp_path, monkeypatch):
    writer = write(tmp_path, [0, 3, 6, 9])
    opened = []
    for module, name in [("builtins", "open"), ("io", "open"), ("os", "open")]:
        original = getattr(__import__(module), name)

        def spy(path, *args, _original=original, **kwargs):
            opened.append(str(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(f"{module}.{name}", spy)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("finalize called np.load"))
    store = writer.finalize()
    monkeypatch.undo()
    assert any(path.endswith("meta.json") for path in opened)  # the spy sees the writes
    assert not [path for path in opened if ".npy" in path]
    for layer in LAYERS:
        expected = np.concatenate([batch(s)[0][layer.name] for s in (0, 3, 6, 9)])
        assert np.array_equal(store[layer.name], expected)


def test_each_activation_byte_is_written_once(tmp_path):
    layers = [LayerInfo(f"wide{i}", "attn1", 1024, resolution=4, block="up") for i in range(2)]
    rng = np.random.default_rng(0)

    def make_store() -> ActivationStore:
        writer = StoreWriter(tmp_path, PROVENANCE, layers, n_total=256)
        for start in range(0, 256, 64):
            writer.write_batch(start, {layer.name: rng.normal(size=(64, 20, 1024)).astype(
                np.float16) for layer in layers}, pd.DataFrame({"index": range(start, start + 64)}))
        return writer.finalize()

    io = io_per_byte_stored(make_store)
    assert io["stored_bytes"] > 2 * 256 * 20 * 1024 * 2
    if io["write_bytes"] == 0:
        pytest.skip("this filesystem (tmpfs?) counts no writes in /proc/self/io")
    assert 0.95 <= io["store_writes"] <= io["write_bytes"] <= 1.05


def test_concurrent_writers_fill_one_store(tmp_path):
    """Jobs writing at once into the same arrays, created once by whichever comes first."""
    reference = write(tmp_path / "reference", [0, 3, 6, 9]).finalize()
    shared = tmp_path / "shared"
    jobs = [multiprocessing.get_context("fork").Process(target=write, args=(shared, starts))
            for starts in ([0, 6], [3], [9])]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
        assert job.exitcode == 0
    store = StoreWriter(shared, PROVENANCE, LAYERS, n_total=12).finalize()
    assert store_files(store.root) == store_files(reference.root)


def test_a_writer_refuses_a_mismatch(tmp_path):
    write(tmp_path / "other", [0])
    with pytest.raises(StoreError, match="cannot write .*other: layer layer0 of batch 3-6 has "
                                         "shape \\(3, 4, 8\\), the store expects \\(3, 5, 8\\)"):
        write(tmp_path / "other", [3], steps=4)
    other = Provenance("collect", "tiny_sdxl", "gender", "synthetic")
    with pytest.raises(ArtefactMismatchError, match="tiny_sd15.*tiny_sdxl"):
        StoreWriter(tmp_path / "other", other, LAYERS, n_total=12)
    with pytest.raises(StoreError, match=f"no activation store at {tmp_path / 'x'}"):
        ActivationStore(tmp_path / "x")
