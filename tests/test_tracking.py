import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import psutil
import pytest
import wandb

from icm_lab.app.runner import run
from icm_lab.io import tracking
from icm_lab.io.tracking import WandbTracker
from tests.conftest import make_config, wandb_records

# Two ways to be refused at once (a malformed key, or a well-formed one that the server
# rejects) and two ways to get no answer (nothing listens, or a listener that never answers).
MALFORMED_KEY, WELL_FORMED_KEY = "bogus", "0123456789abcdef" * 2 + "01234567"


@pytest.mark.slow
def test_offline_wandb_run_holds_the_logged_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logger=wandb", f"paths.root={tmp_path}", "collect.n_images=30",
                      "model.steps=4", "stages=[collect,localize]")
    run(cfg, tmp_path / "run")
    wandb.teardown()  # waits for wandb-core to write the run file: finish() may return first
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log_file,) = offline.glob("run-*.wandb")
    data = log_file.read_bytes()  # protobuf records: logged keys appear as plain bytes
    for key in ("localize/best_attn1", "localize/best_attn2", "localize/separability",
                "localize/layer_ranking", "localize/scores", "tiny_sd15"):
        assert key.encode() in data, key
    media = {p.parent.name + "/" + p.name.split("_")[0] for p in
             (offline / "files" / "media").rglob("*") if p.is_file()}
    assert {"localize/separability", "localize/layer", "localize/scores"} <= media


@pytest.mark.slow
def test_logger_none_writes_no_wandb_files(tmp_path):
    cfg = make_config(f"paths.root={tmp_path}", "collect.n_images=30", "model.steps=4",
                      "stages=[collect,localize]")
    run(cfg, tmp_path / "run")
    assert not Path(tmp_path / "run" / "wandb").exists()


@pytest.mark.slow
def test_each_multirun_job_is_a_wandb_run_in_the_sweep_group_finished_with_its_exit_code(
        tmp_path):
    """Job 0 succeeds; job 1 labels every image undecided (min_confidence 1), so localize fails
    after the run started: its W&B run is still finished, with exit code 1."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "icm_lab", "-m", "model=tiny_sd15", "concept=gender",
         "logger=wandb", "labeler.min_confidence=0.5,1.0", "collect.n_images=30",
         "model.steps=4", "localize.folds=2", "layers.rank_by=separability",
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


# -- W&B never kills a run -------------------------------------------------------------------


class _Refusing(BaseHTTPRequestHandler):
    """A W&B server that rejects every key."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _server(kind: str) -> Iterator[str]:
    """The base URL of a W&B server that is `closed` (nothing listens), `silent` (accepts
    connections, never answers) or `refusing` (HTTP 401 to everything)."""
    if kind == "refusing":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if kind == "silent":
            sock.listen(16)
        else:
            sock.close()
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def fresh_wandb() -> Iterator[None]:
    """wandb reads its environment once per process; start and leave it fresh around a test."""
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture(scope="module")
def warm_root(tmp_path_factory) -> Path:
    """An artefact root holding collect's and localize's results, reused by the runs below."""
    root = tmp_path_factory.mktemp("artefacts")
    run(make_config(f"paths.root={root}", "collect.n_images=30", "model.steps=4",
                    "stages=[collect,localize]"), root / "warmup")
    return root


def _timed_starts(monkeypatch) -> list[float]:
    """Seconds each WandbTracker took to start (its W&B run included), appended as runs start."""
    starts, init = [], WandbTracker.__init__

    def timed(self, *args, **kwargs) -> None:
        began = time.monotonic()
        try:
            init(self, *args, **kwargs)
        finally:
            starts.append(time.monotonic() - began)

    monkeypatch.setattr(WandbTracker, "__init__", timed)
    return starts


def _tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == tracking.__name__ and r.levelno >= logging.WARNING]


def _history(run_file: Path) -> dict[str, object]:
    """Every key logged in an offline run file's history, with its last value; a medium's
    fields (an image's path, a table's row count) under `key/field`."""
    items = [item for record in wandb_records(run_file) if record.HasField("history")
             for item in record.history.item]
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in items}


@pytest.mark.slow  # ~35 s: a warm-up run, then four runs of which two wait for the probe (5 s)
@pytest.mark.parametrize("server, key", [("closed", MALFORMED_KEY), ("closed", WELL_FORMED_KEY),
                                          ("silent", WELL_FORMED_KEY),
                                          ("refusing", WELL_FORMED_KEY)])
def test_wandb_that_cannot_log_online_warns_once_and_the_run_completes_offline(
        server, key, warm_root, tmp_path, monkeypatch, caplog, fresh_wandb):
    starts = _timed_starts(monkeypatch)
    with _server(server) as base_url:
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
        monkeypatch.setenv("WANDB_API_KEY", key)
        with caplog.at_level(logging.WARNING, logger=tracking.__name__):
            results = run(make_config("logger=wandb", f"paths.root={warm_root}",
                                      "collect.n_images=30", "model.steps=4",
                                      "stages=[collect,localize]"), tmp_path / "run")
    wandb.teardown()  # waits for wandb-core to write the run file: finish() may return first
    (start,) = starts
    assert start <= 30, f"W&B kept the run waiting {start:.1f} s"
    (warning,) = _tracking_warnings(caplog)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert "logging offline" in warning and f"wandb sync {offline}" in warning
    for name in ("config.yaml", "layer_ranking.csv", "layer_ranking.png",
                 "selected_layers.json"):
        assert (tmp_path / "run" / name).is_file(), name
    (run_file,) = offline.glob("run-*.wandb")
    best = results["localize"].probes.scores.groupby("kind")["balanced_accuracy"].max()
    history = _history(run_file)
    assert {k: history[f"localize/best_{k}"] for k in best.index} == pytest.approx(best.to_dict())
    assert history["localize/scores/nrows"] == len(results["localize"].probes.scores)
    for media in ("localize/scores", "localize/separability", "localize/layer_ranking"):
        assert (offline / "files" / history[f"{media}/path"]).is_file(), media
    exits = [r.exit.exit_code for r in wandb_records(run_file) if r.HasField("exit")]
    assert exits == [0]  # finished: `wandb sync` uploads it whole
    dry_run = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run",
                              str(offline)], capture_output=True, text=True, timeout=60)
    assert "Would sync 1 run(s)" in dry_run.stderr + dry_run.stdout, dry_run


def _kill_wandb_service() -> None:
    """SIGKILL this process's wandb-core child, as if it had crashed."""
    (service,) = [p for p in psutil.Process().children() if p.name() == "wandb-core"]
    service.kill()
    service.wait(10)


def test_a_wandb_service_dying_mid_run_only_warns_and_the_next_run_starts_afresh(
        tmp_path, caplog, fresh_wandb):
    (tmp_path / "dead").mkdir()
    (tmp_path / "next").mkdir()
    tracker = WandbTracker(tmp_path / "dead", {}, "dead", mode="offline")
    tracker.log_metrics({"before": 1.0})
    _kill_wandb_service()
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        tracker.log_metrics({"after": 2.0})
        tracker.log_table("table", pd.DataFrame({"a": [1]}))
        tracker.finish(exit_code=0)
    (warning,) = _tracking_warnings(caplog)
    assert "logging metrics failed" in warning and str(tmp_path / "dead") in warning
    # a multirun's next job in this process gets a new service and logs normally
    nxt = WandbTracker(tmp_path / "next", {}, "next", mode="offline")
    nxt.log_metrics({"next": 3.0})
    nxt.finish()
    wandb.teardown()
    (run_file,) = (tmp_path / "next" / "wandb").glob("offline-run-*/run-*.wandb")
    assert _history(run_file)["next"] == 3.0
