import os
import subprocess
import sys
from pathlib import Path

import pytest

from icm_lab.runner import run
from tests.conftest import make_config, wandb_records

pytestmark = pytest.mark.slow  # every test here runs the whole pipeline


def test_offline_wandb_run_holds_the_logged_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logger=wandb", f"paths.root={tmp_path}", "collect.n_images=30",
                      "model.steps=4", "stages=[collect,localize]")
    run(cfg, tmp_path / "run")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log_file,) = offline.glob("run-*.wandb")
    data = log_file.read_bytes()  # protobuf records: logged keys appear as plain bytes
    for key in ("localize/best_attn1", "localize/best_attn2", "localize/separability",
                "localize/layer_ranking", "localize/scores", "tiny_sd15"):
        assert key.encode() in data, key
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in
             (offline / "files" / "media").rglob("*") if p.is_file()}
    assert {"localize/separability", "localize/layer", "localize/scores"} <= media


def test_logger_none_writes_no_wandb_files(tmp_path):
    cfg = make_config(f"paths.root={tmp_path}", "collect.n_images=30", "model.steps=4",
                      "stages=[collect,localize]")
    run(cfg, tmp_path / "run")
    assert not Path(tmp_path / "run" / "wandb").exists()


def test_each_multirun_job_is_a_wandb_run_in_the_sweep_group_finished_with_its_exit_code(
        tmp_path):
    """Job 0 succeeds; job 1 labels every image undecided (min_confidence 1), so localize fails
    after the run started: its W&B run is still finished, with exit code 1."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "icm_lab", "-m", "model=tiny_sd15", "concept=gender",
         "logger=wandb", "labeler.min_confidence=0.5,1.0", "collect.n_images=30",
         "model.steps=4",
         "eval.n_images_per_prompt=2", "stages=[collect,localize,steer]",
         f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode != 0 and "localize needs at least 2 decided images" in result.stderr
    runs = {}
    for job in ("0", "1"):
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        records = {r.WhichOneof("record_type"): r for r in wandb_records(run_file)}
        runs[job] = (records["run"].run.run_group, records["run"].run.display_name,
                     records["exit"].exit.exit_code)
    assert runs == {"0": ("sweep", "tiny_sd15-gender-0", 0),
                    "1": ("sweep", "tiny_sd15-gender-1", 1)}
