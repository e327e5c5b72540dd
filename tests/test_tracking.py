from pathlib import Path

from icm_lab.runner import run
from tests.conftest import make_config


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
