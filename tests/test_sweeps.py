"""Sweeps at scale: the ready-made sweeps, launchers, shared and sharded artefacts."""

import json
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from icm_lab.app.runner import objective, run
from icm_lab.app.validation import validate
from icm_lab.config.compose import CONFIG_DIR, register_sweeps
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.io.store import ActivationStore
from icm_lab.models.loading import resolve_device
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_sd15", "concept=gender", "collect.n_images=16", "collect.batch_size=4",
        "model.steps=4", "eval.n_images_per_prompt=2", "localize.folds=2",
        "layers.rank_by=separability"]


def icm_lab(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icm_lab", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("name", register_sweeps())
def test_each_sweep_composes_and_sweeps_over_real_options(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert params, f"sweep {name} sweeps nothing"
        for key, values in params.items():
            if "(" in values:  # an Optuna distribution: interval(1, 40), range(1, 6)
                assert OmegaConf.select(cfg, key) is not None, key
                continue
            for value in values.split(","):  # every value is a real option, valid, and set
                job = compose("config", overrides=[f"+sweep={name}", f"{key}={value}"])
                validate(job)
                chosen = OmegaConf.select(job, key)
                if OmegaConf.is_config(chosen):  # a config group: its option's node
                    assert chosen, (key, value)
                else:
                    assert float(chosen) == float(value), (key, value, chosen)


def test_sweeps_are_listed_for_the_sweep_group():
    assert {"layers_alpha", "probe", "start", "methods", "localization", "optuna"} <= set(
        register_sweeps())


@pytest.mark.slow
def test_two_by_two_multirun_on_submitit_local_shares_one_collection(tmp_path):
    sweep = tmp_path / "sweep"
    result = icm_lab("-m", "hydra/launcher=submitit_local", *TINY, "steer.alpha=5,15",
                     "layers.k=1,2", f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 4
    assert len({(job / "collect").resolve() for job in jobs}) == 1
    stores = (tmp_path / "outputs" / "artefacts" / "collect").iterdir()
    assert len([store for store in stores if store.is_dir()]) == 1
    for job in jobs:
        assert (job / "metrics.json").exists()


def collect_store(root: Path, *overrides: str) -> ActivationStore | None:
    cfg = make_config(*TINY, f"paths.root={root}", "stages=[collect]", *overrides)
    return run(cfg, root / "run")["collect"]


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for layer in a.layers:
        assert np.array_equal(a[layer.name], b[layer.name]), layer.name
    assert a.samples.equals(b.samples)


@pytest.mark.slow
def test_sharded_collection_merges_into_the_unsharded_store(tmp_path):
    reference = collect_store(tmp_path / "reference")
    assert collect_store(tmp_path / "sharded", "collect.num_shards=3", "collect.shard=2") is None
    assert collect_store(tmp_path / "sharded", "collect.num_shards=3", "collect.shard=0") is None
    merged = collect_store(tmp_path / "sharded", "collect.num_shards=3", "collect.shard=1")
    assert merged is not None and ActivationStore.is_complete(merged.root)
    assert_same_store(merged, reference)


@pytest.mark.slow
def test_a_shard_job_cannot_run_later_stages_on_a_partial_store(tmp_path):
    cfg = make_config(*TINY, f"paths.root={tmp_path}", "collect.num_shards=2",
                      "stages=[collect,localize]")
    with pytest.raises(UserError, match="use stages=\\[collect\\] for shard jobs"):
        run(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="collect.shard=2 must be in \\[0, collect.num_shards=2"):
        collect_store(tmp_path, "collect.num_shards=2", "collect.shard=2")


@pytest.mark.slow
def test_concurrent_jobs_share_one_uncorrupted_cache(tmp_path):
    """At once, on one cache: two shard jobs (joblib, in parallel) and two whole runs
    (collect + localize). Every job succeeds and the store equals one collected alone."""
    shared = f"paths.root={tmp_path / 'shared'}"
    commands = [
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "stages=[collect]",
         "collect.num_shards=2", "collect.shard=0,1", shared, f"hydra.sweep.dir={tmp_path}/s"],
        ["-m", *TINY, "stages=[collect,localize]", "seed=0,0", shared,
         f"hydra.sweep.dir={tmp_path}/w"],
    ]
    jobs = [subprocess.Popen([sys.executable, "-m", "icm_lab", *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in commands]
    for job in jobs:
        _, stderr = job.communicate(timeout=900)
        assert job.returncode == 0, stderr[-3000:]
    artefacts = tmp_path / "shared" / "outputs" / "artefacts"
    (store,) = [p for p in (artefacts / "collect").iterdir() if p.is_dir()]
    assert sorted(p.name for p in store.iterdir()) == ["images", "manifest.json",
                                                       "provenance.json", "store"]
    assert not list(store.glob("**/.*.tmp")) and not list(store.glob("store/.*"))
    assert_same_store(ActivationStore(store), collect_store(tmp_path / "alone"))
    assert len([p for p in (artefacts / "localize").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_a_crowded_cache_computes_each_shared_artefact_once(tmp_path):
    """Eight jobs of one sweep, four at once (joblib), on one fresh artefact root: every job
    finishes; collection, probes and base images are each computed by one job and reused by
    the seven others; every file is group-readable."""
    sweep = tmp_path / "sweep"
    result = icm_lab("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *TINY,
                     "steer.alpha=5,10,15,20", "layers.k=1,2", f"paths.root={tmp_path}",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 8 and all((job / "metrics.json").exists() for job in jobs)
    logs = [next(job.glob("*.log")).read_text() for job in jobs]
    for reused in ("collect: reusing", "localize: reusing", "steer: reusing the base images"):
        assert sum(reused in log for log in logs) == 7, reused  # computed exactly once
    artefacts = tmp_path / "outputs" / "artefacts"
    for stage in ("collect", "localize", "base"):
        assert len([p for p in (artefacts / stage).iterdir() if p.is_dir()]) == 1, stage
    # Locks are released by the OS when their holder exits: that every job finished is the
    # check that none waited forever. No job left a temporary behind.
    assert not list(artefacts.rglob(".*.tmp"))
    for path in artefacts.rglob("*"):
        readable = 0o055 if path.is_dir() else 0o044  # folders must be enterable too
        assert path.stat().st_mode & readable == readable, path


@pytest.mark.slow
def test_optuna_sweep_minimises_the_objective_over_alpha_and_k(tmp_path):
    sweep = tmp_path / "optuna"
    result = icm_lab("-m", "+sweep=optuna", *TINY, "hydra.sweeper.n_trials=2",
                     "objective.clip_i_floor=0.5", f"paths.root={tmp_path}",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {"steer.alpha", "layers.k"}
    assert 1 <= best.best_params["steer.alpha"] <= 40 and 0 <= best.best_value
    metrics = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(metrics) == 2
    assert min(objective(OmegaConf.create({"objective": {"metric": "fd", "clip_i_floor": 0.5}}),
                         m) for m in metrics) == pytest.approx(best.best_value)


@pytest.mark.parametrize("metric,feasible_value", [
    ("fd", 0.9), ("fd", 1.17),  # FD exceeds 1 for non-uniform targets
    ("fid", 250.0), ("kid", 40.0),  # unbounded
])
def test_objective_ranks_trials_under_the_clip_i_floor_behind_every_other(metric,
                                                                          feasible_value):
    cfg = OmegaConf.create({"objective": {"metric": metric, "clip_i_floor": 0.8}})
    feasible = objective(cfg, {"steered": {metric: feasible_value, "clip_i": 0.85}})
    infeasible = objective(cfg, {"steered": {metric: 0.01, "clip_i": 0.7}})
    nearly = objective(cfg, {"steered": {metric: 0.01, "clip_i": 0.79}})
    assert feasible == feasible_value
    assert feasible < nearly < infeasible  # infeasible trials ranked by their shortfall
    assert objective(cfg, None) is None


def _job_devices(monkeypatch, tmp_path, gpus: int, jobs: int, **env: str) -> list[str]:
    """`model.device=auto` resolved in each job of a real Hydra multirun (the basic launcher:
    in this process, so the mocked GPU count holds), on a node with `gpus` GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    devices = []
    (tmp_path / "job.yaml").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "job.yaml").write_text("x: 0\n")

    @hydra.main(config_path=str(tmp_path), config_name="job", version_base=None)
    def job(cfg) -> None:
        devices.append(str(resolve_device("auto")))

    monkeypatch.setattr(sys, "argv", ["job", "-m", f"x={','.join(map(str, range(jobs)))}",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    # The multirun leaves its last job's HydraConfig set: restore it for the tests after this.
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    job()
    return devices


def test_each_job_of_a_multirun_takes_its_own_gpu(monkeypatch, tmp_path):
    for var in ("SLURM_LOCALID", "SUBMITIT_LOCAL_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert _job_devices(monkeypatch, tmp_path / "a", gpus=4, jobs=6) == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]  # job number modulo 4
    # SLURM shows each task its own GPU: every job takes the only one it sees.
    assert _job_devices(monkeypatch, tmp_path / "b", gpus=1, jobs=3) == ["cuda:0"] * 3
    # Several tasks of one job on a node (SLURM_LOCALID) spread over its GPUs too.
    assert _job_devices(monkeypatch, tmp_path / "c", gpus=4, jobs=2, SLURM_LOCALID="2") == [
        "cuda:2", "cuda:3"]


def test_a_single_run_and_explicit_devices_keep_their_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.delenv("SUBMITIT_LOCAL_LOCALID", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)  # no Hydra job: job number 0
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
