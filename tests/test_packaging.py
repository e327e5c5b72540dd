"""A non-editable install: the wheel carries conf/ and sweeps/, so the commands run anywhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (no dependencies: this venv has them) into
    a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                    str(ROOT)], check=True)
    wheel = next((tmp / "dist").glob("icm_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "icm_lab/conf/config.yaml" in names and "icm_lab/sweeps/methods.yaml" in names
    assert "icm_lab/toy/weights/clip.safetensors" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def run_installed(site: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # before the checkout's editable path
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_installed_wheel_runs_from_any_directory(installed, tmp_path):
    where = run_installed(installed, tmp_path, sys.executable, "-c",
                          "import icm_lab.config.compose as c; print(c.CONFIG_DIR, c.SWEEPS_DIR)")
    assert where.stdout.split() == [str(installed / "icm_lab" / "conf"),
                                    str(installed / "icm_lab" / "sweeps")], where.stderr
    for command in ([sys.executable, "-m", "icm_lab", "--help"],
                    [str(installed / "bin" / "icm-lab"), "--help"]):
        result = run_installed(installed, tmp_path, *command)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "concept" in result.stdout and "Primary config directory" not in result.stderr
    listing = run_installed(installed, tmp_path, sys.executable, "-m", "icm_lab", "layers",
                            "model=toy")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "attn1" in listing.stdout
