import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # every test here starts the command line in a subprocess


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_help_lists_groups_and_subcommands():
    result = run(sys.executable, "-m", "icm_lab", "--help")
    assert result.returncode == 0, result.stderr
    assert "python -m icm_lab layers" in result.stdout
    assert "model: " in result.stdout and "tiny_sd15" in result.stdout
    assert "concept: age, color, gender, race, size\n" in result.stdout
    assert "concept/base" not in result.stdout  # the people concepts' shared part: no choice
    assert "make tables" in result.stdout and "docs/metrics.md" in result.stdout
    assert "icm_lab: starting" not in result.stdout  # help prints help only


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "icm-lab"
    assert script.exists(), "pip install -e . should install the icm-lab console script"
    result = run(str(script), "layers", "model=tiny_sana")
    assert result.returncode == 0, result.stderr
    assert "tiny_sana: 8 hook points" in result.stdout
    assert "transformer_blocks.3.attn2" in result.stdout


def test_default_run_reports_where_results_are(tmp_path):
    """What `make run` does (the toy world, end to end), with only the output paths moved."""
    result = run(sys.executable, "-m", "icm_lab", f"paths.root={tmp_path}",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert f"results in {tmp_path / 'run'}" in result.stdout
    assert (tmp_path / "run" / "collect" / "store" / "meta.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "localize" / "separability.png").exists()
    assert (tmp_path / "run" / "layer_ranking.png").exists()
    assert len(list((tmp_path / "run" / "steer" / "grids").glob("*.png"))) == 3  # eval prompts
    assert (tmp_path / "run" / "metrics.json").exists()


def test_bad_stage_fails_with_a_clear_message(tmp_path):
    result = run(sys.executable, "-m", "icm_lab", "stages=[colect]", f"paths.root={tmp_path}",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "icm_lab: error: stages=['colect'] is not valid; choose one of ['collect', 'localize', "
        "'causal', 'steer', 'evaluate']")
    assert not (tmp_path / "run").exists()


def test_a_sweep_with_one_bad_value_runs_no_job(tmp_path):
    result = run(sys.executable, "-m", "icm_lab", "-m", "steer.alpha=5,nan", "layers.k=1,2",
                 f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "icm_lab: error: steer.alpha=nan must be a finite number")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "outputs").exists()


def test_alpha_by_layers_multirun_shares_collection_and_probes(tmp_path):
    result = run(sys.executable, "-m", "icm_lab", "-m", "model=tiny_sd15", "concept=gender",
                 "steer.alpha=5,15", "layers=auto,paper_sd15", "collect.n_images=30",
                 "model.steps=4", "eval.n_images_per_prompt=2", "localize.folds=2",
                 "layers.rank_by=separability", f"paths.root={tmp_path}",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 4
    for job in jobs:
        assert (job / "steer" / "images.parquet").exists()
        assert (job / "collect").resolve() == (jobs[0] / "collect").resolve()
    artefacts = tmp_path / "outputs" / "artefacts"
    assert [len([p for p in (artefacts / stage).iterdir() if p.is_dir()])
            for stage in ("collect", "localize", "base")] == [1, 1, 1]
    alphas = {OmegaConf.load(job / "config.yaml").steer.alpha for job in jobs}
    assert alphas == {5.0, 15.0}
