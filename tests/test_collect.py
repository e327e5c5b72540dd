import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icm_lab.artefacts import ArtefactMismatchError, Provenance
from icm_lab.errors import ConfigError
from icm_lab.runner import run
from icm_lab.sampling import sample_plan
from icm_lab.store import ActivationStore
from tests.conftest import make_config

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


def test_killed_collection_resumes_to_an_identical_store(tmp_path):
    args = ["model=tiny_sd15", "concept=gender", *SMALL, "collect.n_images=16",
            "hydra.run.dir=" + str(tmp_path / "runs" / "x")]
    reference = run_collect(tmp_path / "reference", "collect.n_images=16")

    killed = tmp_path / "killed"
    process = cli(*args, f"paths.root={killed}")
    shards = None
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = list(killed.glob("outputs/artefacts/collect/*/shards/0*"))
        if len(found) >= 2:
            process.send_signal(signal.SIGKILL)
            shards = len(found)
            break
        time.sleep(0.01)
    process.wait()
    assert shards is not None, "the run finished before it could be killed"
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
