"""Fail fast: every user-facing value is refused when the config is composed, in one line that
names the key, the bad value and the valid choices, before anything is loaded or written."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icm_lab.app.cli import check_overrides
from tests.conftest import TEST_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent

REFUSED = [  # (overrides, what the one line must say)
    (["model=sd14"], "model='sd14' is not valid; choose one of ["),
    (["seed=-1"], "seed=-1 must be an integer in [0, 2**31)"),
    (["concept=hair_colour"], "concept='hair_colour' is not valid; choose one of ["),
    (["method=icmm"], "method='icmm' is not valid; choose one of ["),
    (["probe=svm"], "probe='svm' is not valid; choose one of ["),
    (["labeler=dlib"], "labeler='dlib' is not valid; choose one of ["),
    (["stages=[collect,localise]"], "stages=['collect', 'localise'] is not valid; choose one"),
    (["stages=[]"], "stages=[] is not valid"),
    (["layers.select=[up_blocks.7.attn1]"], "unknown layer 'up_blocks.7.attn1'"),
    (["collect.record=[mid_blok]"], "unknown layer 'mid_blok'. Did you mean ['mid_block']"),
    (["collect.n_images=0"], "collect.n_images=0 must be an integer >= 1"),
    (["collect.n_images=-3"], "collect.n_images=-3 must be an integer >= 1"),
    (["collect.n_images=2.5"], "collect.n_images: Value '2.5' of type 'float' could not be "
                               "converted to Integer"),
    (["collect.n_images=many"], "collect.n_images: Value 'many'"),
    (["steer.alpha=nan"], "steer.alpha=nan must be a finite number"),
    (["steer.alpha=inf"], "steer.alpha=inf must be a finite number"),
    (["steer.start=1.5"], "steer.start=1.5 must be a number in [0.0, 1.0]"),
    (["steer.start=-0.1"], "steer.start=-0.1 must be a number in [0.0, 1.0]"),
    (["steer.end=1.2"], "steer.end=1.2 must be a number in [0.0, 1.0]"),
    (["steer.start=0.6", "steer.end=0.4"], "steer.start=0.6 must be below steer.end=0.4"),
    (["eval.features=vgg"], "eval.features='vgg' is not valid; choose one of ['clip', "
                            "'inception']"),
    (["steer.policy=some"], "steer.policy='some' is not valid; choose one of ['all', "
                            "'minimal', 'paper_batch']"),
    (["steer.direction=pca"], "steer.direction='pca' is not valid; choose one of ['probe', "
                              "'mean_diff']"),
    (["probe.C=0"], "probe.C=0 must be a positive number"),
    (["labeler.min_confidence=2"], "labeler.min_confidence must be in [0, 1], got 2"),
    (["method=attn2", "layers.select=[mid_block]"], "has no cross-attention partner"),
    (["objective.metric=speed"], "objective.metric='speed' is not valid"),
    (["objective.clip_i_floor=2"], "objective.clip_i_floor=2.0 must be a number in [0.0, 1.0]"),
    (["collect.record=[attn2]"], "layers=auto ranks attn1 layers, but collect.record=['attn2'] "
                                 "records none"),
    (["concept.target=[0.7,0.7]"], "target [0.7, 0.7] must be 2 non-negative shares summing"),
    (["clip.batch_size=0"], "clip.batch_size=0 must be a positive integer"),
    (["+clip.colour=1"], "clip: got an unexpected keyword argument 'colour'"),
    (["model=toy", "concept=gender"], "concept='gender' is not valid for model=toy; choose one "
                                      "of ['color', 'size']"),
    (["layers=[not.a.layer]"], "layers='not.a.layer' is not valid; choose one of ['all', "
                               "'all_attn1', 'all_attn2', 'auto', 'bottleneck', 'paper_sd15'], "
                               "or give layer names as layers.select=[name,...]"),
    # Missing weights (tests run with HF_HUB_OFFLINE=1): what is wrong and what to type.
    (["model=sd15", "model.pretrained=icm-lab/not-cached"],
     "model=sd15 needs the weights 'icm-lab/not-cached', which are not in the Hugging Face "
     "cache, and HF_HUB_OFFLINE=1 forbids downloading them. Run `hf download "
     "icm-lab/not-cached` where there is network, or pass model.pretrained=/path/to/sd15"),
    (["model=sd15", "model.pretrained=/no/such/folder"],
     "model.pretrained='/no/such/folder' is not a folder"),
    (["clip.model=ViT-B-32-quickgelu", "clip.pretrained=openai"],
     "CLIP ViT-B-32-quickgelu (openai) needs the weights "
     "'timm/vit_base_patch32_clip_224.openai', which are not in the Hugging Face cache"),
    (["clip.model=ViT-B-32", "clip.pretrained=opnai"], "clip.pretrained='opnai' is not valid "
                                                       "for clip.model=ViT-B-32; choose one of"),
    (["eval.kid_subsets=0"], "eval.kid_subsets=0 must be an integer >= 1"),
]
if importlib.util.find_spec("torch_fidelity") is None:  # not a dependency of icm_lab
    REFUSED.append((["eval.features=inception"], "eval.features=inception needs torch-fidelity"))


@pytest.mark.parametrize("overrides,message", REFUSED,
                         ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_bad_values_are_refused_in_one_line(overrides, message, tmp_path, capsys):
    defaults = [f"{k}={v}" for k, v in TEST_DEFAULTS.items()
                if not any(o.startswith(f"{k}=") for o in overrides)]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        check_overrides([*defaults, f"paths.root={tmp_path}", *overrides])
    assert time.perf_counter() - start < 5  # seconds, not a collection
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("icm_lab: error: "), err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written: no artefact folder, no lock


def test_a_valid_config_passes(tmp_path):
    check_overrides([f"paths.root={tmp_path}"])  # the default: the toy world
    check_overrides(["model=tiny_sana", "concept=gender", "layers=all_attn2", "method=attn2"])


def test_the_command_says_it_started_within_two_seconds():
    """Importing torch and diffusers takes seconds: the first line comes before them."""
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-m", "icm_lab", "stages=[colect]"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as job:
        first = job.stdout.readline()
        elapsed = time.perf_counter() - start
        job.kill()
    assert first.startswith("icm_lab: starting"), first
    assert elapsed < 2, elapsed


@pytest.mark.slow
def test_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "icm_lab", "steer.alpha=nan", f"paths.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("icm_lab: error: steer.alpha=nan must be a finite number")
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_traceback_stays_available(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "icm_lab", "layers.select=[nope]", f"paths.root={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UnknownLayerError" in result.stderr
