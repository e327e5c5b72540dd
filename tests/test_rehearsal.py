"""The GPU rehearsal's kit and script stay working without a GPU: `make gpu-smoke` runs the same
script on the tiny twins on the CPU."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from icm_lab.tools.rehearsal import SECTIONS

KIT = Path(__file__).resolve().parent.parent / "icm_lab" / "tools" / "gpu_kit.txt"


def kit() -> dict[str, str]:
    pins = {}
    for line in KIT.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, pinned = line.split("==")
            pins[name] = pinned
    return pins


def test_the_kit_pins_the_versions_the_suite_runs_with():
    assert {name: version(name) for name in kit()} == kit()


def test_the_run_path_imports_without_wandb():
    """wandb is not in the kit: a machine without it runs everything but logger=wandb."""
    code = ("import sys; sys.modules['wandb'] = None  # import wandb now raises ImportError\n"
            "import icm_lab.app.cli, icm_lab.app.runner, icm_lab.tools.rehearsal; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "wandb" not in " ".join(kit())


@pytest.mark.slow
def test_the_smoke_rehearsal_runs_every_section(tmp_path):
    done = subprocess.run([sys.executable, "-m", "icm_lab.tools.rehearsal", str(tmp_path),
                           "--smoke"], capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "rehearsal.json").read_text())
    errors = {name: report[name]["error"] for name in [*SECTIONS, "hours"]
              if "error" in report[name]}
    assert done.returncode == 0 and not errors, (errors, done.stdout[-2000:])
    sides = report["sd15"]["batches"]["2"]
    assert set(sides) == {"plain", "record", "steer"}
    for name in ("record", "steer"):  # the ratio of the fastest repetitions, and of medians
        assert sides[name]["vs_plain"] == min(sides["plain"]["seconds"]) / min(
            sides[name]["seconds"])
    assert report["sd15"]["host_syncs"]["plain"]["per_step"] is None  # no CUDA here
    toy, sd15 = report["pipeline"]["toy"], report["pipeline"]["sd15"]
    assert toy["exit_status"] == 0 and sd15["exit_status"] == 0
    assert set(toy["denoiser_calls"]) >= {"collect", "causal", "steer"}
    assert {"collect", "localize", "causal", "base"} <= set(toy["artefacts"])
    assert report["probes"]["delta_balanced_accuracy"]["mean"] < 0.05
    for family in ("sdxl", "sana"):
        assert report[family]["record"]["recorded_layers"] == report[family]["hook_points"]
    assert set(report["hours"]["rates_image_steps_per_s"]) == {"sd15", "sdxl", "sana"}
    text = (tmp_path / "rehearsal.md").read_text()
    assert "## tiny_sd15" in text and "Smoke scale" in text and "| paper_sd15_gender |" in text
