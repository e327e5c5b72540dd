import json
import logging
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from icm_lab.app.cli import reference_stats_command
from icm_lab.app.runner import run
from icm_lab.app.validation import validate
from icm_lab.core.errors import UserError
from icm_lab.evaluation.metrics import (
    ClipImageFeatures,
    _resampled,
    bootstrap_fairness,
    clip_score,
    extract,
    fairness,
    fairness_by_prompt,
    fid_kid,
    frechet_distance,
    kid_subset,
    reference_statistics,
    save_reference_statistics,
)
from tests.conftest import TEST_DEFAULTS, make_config


def test_binary_fairness_by_hand():
    labels = ["male", "male", "female", "undecided"]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    result = fairness(labels, probs, ["male", "female"], np.array([0.5, 0.5]))
    f = np.array([2 / 3, 1 / 3])  # the undecided image does not count towards f
    assert result["fd"] == pytest.approx(math.sqrt(2) / 6)
    assert result["fd_soft"] == pytest.approx(np.linalg.norm([0.625 - 0.5, 0.375 - 0.5]))
    assert result["kl"] == pytest.approx((f * np.log(f / 0.5)).sum())
    assert result["deviation"] == pytest.approx((1 / 6) / 0.5)
    assert (result["n_images"], result["n_undecided"]) == (4, 1)


def test_multiclass_fairness_with_a_non_uniform_target():
    labels = ["a", "a", "b", "c", "c", "c"]
    target = np.array([0.5, 0.25, 0.25])
    result = fairness(labels, np.full((6, 3), 1 / 3), ["a", "b", "c"], target)
    f = np.array([2, 1, 3]) / 6
    assert result["fd"] == pytest.approx(np.linalg.norm(f - target))
    assert result["fd_soft"] == pytest.approx(np.linalg.norm(1 / 3 - target))
    assert result["kl"] == pytest.approx((f * np.log(f / target)).sum())
    assert result["deviation"] == pytest.approx(0.25 / 0.75)
    fair = fairness(["a", "a", "b", "c"], np.full((4, 3), 1 / 3), ["a", "b", "c"], target)
    assert fair["fd"] == pytest.approx(0) and fair["kl"] == pytest.approx(0)
    assert math.isinf(fairness(["b"], np.ones((1, 2)) / 2, ["a", "b"], np.array([1.0, 0.0]))["kl"])


def test_fairness_is_averaged_over_prompts():
    table = pd.DataFrame({"prompt": ["p"] * 4 + ["q"] * 4,
                          "label": ["m", "m", "m", "m", "m", "f", "m", "f"],
                          "p_m": 0.5, "p_f": 0.5})
    result = fairness_by_prompt(table, "label", "p_", ["m", "f"], np.array([0.5, 0.5]))
    assert result["fd"] == pytest.approx((math.sqrt(0.5) + 0) / 2)
    assert set(result["per_prompt"]) == {"p", "q"}
    with pytest.raises(ValueError, match="zero"):
        fairness([], np.zeros((0, 2)), ["m", "f"], np.array([0.5, 0.5]))


def test_pooled_fd_lets_opposite_biases_cancel():
    """One prompt all m, the other all f: per prompt both are as far from 50/50 as can be
    (the paper's FD), pooled they are exactly on target."""
    table = pd.DataFrame({"prompt": ["p"] * 4 + ["q"] * 4, "label": ["m"] * 4 + ["f"] * 4,
                          "p_m": [1.0] * 4 + [0.0] * 4, "p_f": [0.0] * 4 + [1.0] * 4})
    result = fairness_by_prompt(table, "label", "p_", ["m", "f"], np.array([0.5, 0.5]))
    assert result["fd"] == pytest.approx(math.sqrt(0.5))
    assert result["fd_pooled"] == pytest.approx(0) and result["fd_soft_pooled"] == pytest.approx(0)


def test_soft_frequencies_average_over_readings_not_images():
    """FairFace reads every face: an image with two faces weighs twice in p (the paper's mean
    softmax over crops), an image with none (NaN row) not at all."""
    table = pd.DataFrame({"prompt": ["p"] * 3, "label": ["m", "f", "undecided"],
                          "p_m": [1.0, 0.0, np.nan], "p_f": [0.0, 1.0, np.nan],
                          "weight": [2.0, 1.0, 0.0]})
    result = fairness_by_prompt(table, "label", "p_", ["m", "f"], np.array([0.5, 0.5]), "weight")
    assert result["fd_soft"] == pytest.approx(np.linalg.norm([2 / 3 - 0.5, 1 / 3 - 0.5]))
    assert result["fd"] == pytest.approx(0)  # labels: one image each way
    unweighted = fairness_by_prompt(table, "label", "p_", ["m", "f"], np.array([0.5, 0.5]))
    assert unweighted["fd_soft"] == pytest.approx(0)


def bootstrap_table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["m", "f", "undecided"], size=(2 * n,), p=[0.6, 0.3, 0.1])
    p_m = rng.random(2 * n)
    return pd.DataFrame({"prompt": ["p"] * n + ["q"] * n, "label": labels, "p_m": p_m,
                         "p_f": 1 - p_m, "weight": rng.integers(1, 3, 2 * n).astype(float),
                         "clip_t": rng.random(2 * n), "clip_i": rng.random(2 * n)})


def test_bootstrap_resamples_are_the_metrics_of_resampled_tables():
    """The vectorised resampling equals fairness_by_prompt on each resampled table, drawn
    within each prompt."""
    table, classes, target = bootstrap_table(20), ["m", "f"], np.array([0.5, 0.5])
    rng = np.random.default_rng(7)
    draws = {prompt: rng.integers(0, 20, (4, 20)) for prompt in ("p", "q")}
    fast = _resampled(table, draws, "label", "p_", "weight", classes, target)
    for b in range(4):
        rows = pd.concat([table[table["prompt"] == prompt].iloc[draws[prompt][b]]
                          for prompt in ("p", "q")])
        slow = fairness_by_prompt(rows, "label", "p_", classes, target, "weight")
        for key in ("fd", "fd_soft", "kl", "deviation", "fd_pooled"):
            assert fast[key][b] == pytest.approx(slow[key]), key
        assert fast["clip_i"][b] == pytest.approx(rows["clip_i"].mean())


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_images():
    classes, target = ["m", "f"], np.array([0.5, 0.5])
    sides = {"base": ("label", "p_", "weight"), "steered": ("label", "p_", "weight")}
    widths = []
    for n in (20, 500):
        table = bootstrap_table(n)
        ci = bootstrap_fairness(table, sides, classes, target, seed=0)
        point = fairness_by_prompt(table, "label", "p_", classes, target, "weight")
        for key in ("fd", "fd_pooled", "fd_soft"):
            low, high = ci["base"][key]
            assert low <= point[key] <= high, key
        assert ci["change"]["fd"] == [0.0, 0.0]  # the same images on both sides: paired
        assert len(ci["base"]["per_prompt"]["p"]) == 2  # [low, high] per class
        widths.append(ci["base"]["fd"][1] - ci["base"]["fd"][0])
    assert widths[1] < widths[0] * 0.6
    again = bootstrap_fairness(bootstrap_table(20), sides, classes, target, seed=0)
    assert again["base"]["fd"] == bootstrap_fairness(bootstrap_table(20), sides, classes,
                                                     target, seed=0)["base"]["fd"]  # seeded


@pytest.mark.parametrize("shares", [[0.5, 0.5], [0.55, 0.45], [0.7, 0.3]])
def test_fd_intervals_cover_the_true_distance_where_the_plain_percentile_does_not(shares):
    """Simulated labels with a known true FD (0: a fair model; 0.071; 0.283), 4 prompts of 32
    images: the intervals cover it in at least ~90% of data sets. The plain percentile interval
    of the plug-in FD never covers a fair model's 0: 32 images a prompt alone put FD near 0.1."""
    truth, target = np.linalg.norm(np.subtract(shares, 0.5)), np.full(2, 0.5)
    covered, naive, runs = 0, 0, 50
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        labels = rng.choice(["m", "f"], size=128, p=shares)
        table = pd.DataFrame({"prompt": np.repeat(["p", "q", "r", "s"], 32), "label": labels,
                              "p_m": (labels == "m") * 1.0, "p_f": (labels == "f") * 1.0})
        ci = bootstrap_fairness(table, {"base": ("label", "p_", None)}, ["m", "f"], target,
                                seed=seed, resamples=200)["base"]
        covered += ci["fd"][0] <= truth <= ci["fd"][1]
        draws = {p: rng.integers(0, 32, (200, 32)) for p in "pqrs"}
        plain = np.percentile(_resampled(table, draws, "label", "p_", None, ["m", "f"],
                                         target)["fd"], [2.5, 97.5])
        naive += plain[0] <= truth <= plain[1]
    assert covered / runs >= 0.88, covered
    if truth == 0:
        assert naive == 0, naive


@pytest.fixture(scope="module")
def tiny_clip():
    return instantiate(make_config().clip)()


def test_clip_i_is_one_for_identical_images(tiny_clip):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8))
              for i in range(3)]
    features = tiny_clip.encode_images(images)
    assert torch.allclose(clip_score(features, features), torch.ones(3))
    assert (clip_score(features, features.roll(1, 0)) < 1).all()


def test_fid_is_zero_against_itself_and_grows_with_shift(tiny_clip):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 32, 32, generator=g) * 0.5
    shifted = (real + 0.3).clamp(0, 1)
    feature = ClipImageFeatures(tiny_clip)
    same = fid_kid(real, real, feature)
    moved = fid_kid(real, shifted, feature)
    assert abs(same["fid"]) < 1e-3
    assert moved["fid"] > 100 * max(abs(same["fid"]), 1e-4)
    # KID is unbiased, so a set against itself scatters around 0 (slightly negative at times).
    assert moved["kid"] > 10 * abs(same["kid"])


def test_kid_uses_seeded_subsets_and_warns_nothing(tiny_clip):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(24, 3, 32, 32, generator=g)
    shifted = (real + 0.2).clamp(0, 1)
    feature = ClipImageFeatures(tiny_clip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fid_kid(real, shifted, feature, seed=1)
    assert not [w for w in caught if "Kernel Inception" in str(w.message)]
    assert fid_kid(real, shifted, feature, seed=1) == first  # reproducible
    assert fid_kid(real, shifted, feature, seed=2)["kid"] != first["kid"]
    assert first["kid_std"] > 1e-4  # subsets of half the set differ; all images gave 0


def test_kid_of_paired_sets_draws_disjoint_seeds(tiny_clip):
    """Steered image i and base image i share a seed. Subsets holding the same images on both
    sides pull the unbiased estimate below zero; disjoint seeds leave it at zero."""
    images = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feature = ClipImageFeatures(tiny_clip)
    paired = fid_kid(images, images, feature, paired=True)
    shared = fid_kid(images, images, feature, paired=False)
    assert abs(paired["kid"]) < paired["kid_std"]
    assert shared["kid"] < -shared["kid_std"]
    assert abs(paired["kid"]) < abs(shared["kid"]) / 5


def test_kid_subset_size():
    assert kid_subset(96, 96) == 48
    assert kid_subset(96, 40) == 20
    assert kid_subset(3, 3) == 2  # the unbiased estimator needs two images
    assert kid_subset(5000, 5000) == 1000
    assert kid_subset(96, 96, size=30) == 30
    with pytest.raises(UserError, match="eval.kid_subset_size=100 exceeds the 96 images"):
        kid_subset(96, 120, size=100)


@pytest.mark.slow
def test_metrics_json_schema_and_method_none_is_neutral(tmp_path, capfd, caplog):
    cfg = make_config(f"paths.root={tmp_path}", "collect.n_images=30", "model.steps=4",
                      "eval.n_images_per_prompt=3", "method=none")
    with caplog.at_level(logging.INFO, logger="icm_lab"):
        run(cfg, tmp_path / "run")
    assert "evaluate: 100%" in capfd.readouterr().err  # its progress bar
    steer_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("steer:")]
    assert "steer: method=none (no layer is written to)" in steer_lines
    assert not [line for line in steer_lines if "alpha" in line]  # none has no strength
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("model", "concept", "method", "layers", "alpha", "step_window", "direction",
                "halves", "renorm", "probe_set", "sampler", "labeler", "features",
                "kid_subsets"):
        assert key in metrics
    # method=none adds no vector: no strength, window or direction is claimed for it.
    assert metrics["method"] == "none" and metrics["layers"] == []
    assert metrics["alpha"] is None and metrics["step_window"] is None
    assert metrics["labeler"]["name"] == "clip"
    assert metrics["sampler"]["steps"] == 4
    assert metrics["features"] == {"name": "clip", "image_tower_of": {
        "clip": "icm-tiny-clip", "pretrained": None}}
    assert metrics["kid_subsets"] == {"size": 18, "count": 100}  # half of 36 images
    assert metrics["steered"]["kid_std"] > 0  # subsets differ
    for side in ("base", "steered"):
        for key in ("fd", "fd_soft", "kl", "deviation", "clip_t", "n_images", "n_undecided"):
            assert key in metrics[side], (side, key)
    for key in ("fid", "kid", "clip_i"):
        assert key in metrics["steered"]
    # method=none: the steered images are the base images.
    assert metrics["steered"]["fd"] == metrics["base"]["fd"]
    assert metrics["steered"]["clip_i"] == pytest.approx(1.0)
    assert abs(metrics["steered"]["fid"]) < 1e-3
    table = pd.read_parquet(tmp_path / "run" / "evaluate" / "images.parquet")
    assert len(table) == metrics["steered"]["n_images"] == 12 * 3
    assert {"clip_t", "clip_i", "base_clip_t"} <= set(table)
    assert (tmp_path / "run" / "evaluate" / "distribution.png").exists()


@pytest.mark.slow
def test_reference_folder(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(6):
        Image.fromarray(np.full((48, 48, 3), 40 * i, np.uint8)).save(reference / f"{i}.png")
    base = ["collect.n_images=30", "model.steps=4", "eval.n_images_per_prompt=2"]
    cfg = make_config(f"paths.root={tmp_path}", *base, f"eval.reference_dir={reference}")
    metrics = run(cfg, tmp_path / "run")["evaluate"]
    assert "fid_reference" in metrics["steered"] and "kid_reference" in metrics["steered"]

    stats = tmp_path / "reference.npz"  # the same folder as statistics: FID without the images
    model = [f"{key}={value}" for key, value in TEST_DEFAULTS.items()]  # the run's CLIP
    reference_stats_command([str(reference), str(stats), *model])
    cfg = make_config(f"paths.root={tmp_path}", *base, f"eval.reference_stats={stats}")
    steered = run(cfg, tmp_path / "run2")["evaluate"]["steered"]
    assert steered["fid_reference_stats"] > 0 and math.isfinite(steered["fid_reference_stats"])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="eval.reference_stats=.*bad.npz.* is not an .npz"):
        validate(make_config(f"eval.reference_stats={tmp_path / 'bad.npz'}"))


def test_fid_against_statistics_matches_torchmetrics_fid(tmp_path, tiny_clip):
    """Saved statistics give the FID torchmetrics computes from the images themselves, zero
    against the same set, and a width mismatch is refused in one line."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    real, fake = torch.rand(12, 3, 32, 32), torch.rand(12, 3, 32, 32) * 0.5
    feature = ClipImageFeatures(tiny_clip)
    path = save_reference_statistics(real, feature, tmp_path / "real.npz")
    mu, sigma = reference_statistics(path, feature.num_features)
    fake_features = extract(fake, feature)
    oracle = FrechetInceptionDistance(feature=Passthrough(feature.num_features))
    oracle.update(extract(real, feature), real=True)
    oracle.update(fake_features, real=False)
    assert frechet_distance(mu, sigma, fake_features) == pytest.approx(float(oracle.compute()),
                                                                        rel=1e-6)
    assert frechet_distance(mu, sigma, extract(real, feature)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(UserError, match=r"holds mu \(\d+,\) .* 7 wide"):
        reference_statistics(path, 7)


class Passthrough(torch.nn.Module):
    """Features given to torchmetrics' FID as they are."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
