"""The causal map: each layer alone steered toward each class, its effect with a paired bootstrap
interval, layers ranked by it (layers.rank_by=causal), and what it costs."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import HydraException

from icm_lab.app.cli import error_line
from icm_lab.app.runner import Run, run
from icm_lab.app.validation import validate
from icm_lab.config.schema import CausalConfig
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.selection import ALL_CLASSES, STEERING, LayerSelection, rank_effects
from icm_lab.engine.generation import Generator, Prefix, PrefixRows
from icm_lab.engine.hooks import AddVector
from icm_lab.stages.causal import (
    BOOTSTRAP,
    batch_rows,
    bootstrap_interval,
    effects,
    naive_calls,
    step_windows,
)
from tests.conftest import make_config

CLASSES = ["red", "blue"]


def labelled(labels: list[str], **columns) -> pd.DataFrame:
    """A table of images 0..n-1 with their labels and one-hot class probabilities (none for
    undecided images, as the oracle gives)."""
    table = pd.DataFrame({"index": np.arange(len(labels)), "label": labels, **columns})
    for name in CLASSES:
        table[f"p_{name}"] = [np.nan if label == "undecided" else float(label == name)
                              for label in labels]
    return table


def steered_runs(layer: str, kind: str, toward: dict[str, list[str]]) -> pd.DataFrame:
    """One layer's images steered toward each class, in the stage's table layout."""
    return pd.concat([labelled(labels, window=STEERING, layer=layer, kind=kind, target=name)
                      for name, labels in toward.items()], ignore_index=True)


def test_effects_are_paired_shifts_with_intervals_that_bracket_them():
    base = labelled(["red", "red", "blue", "undecided", "red", "blue", "red", "red"])
    steered = pd.concat([
        steered_runs("strong", "attn1", {  # every image turns to the target
            "red": ["red"] * 8, "blue": ["blue"] * 8}),
        steered_runs("none", "attn1", {  # the base images again
            "red": list(base["label"]), "blue": list(base["label"])}),
    ], ignore_index=True)
    table = effects(base, steered, CLASSES, seed=0)
    assert len(table) == 2 * (len(CLASSES) + 1)  # layers x (classes + their mean)
    row = table.set_index(["layer", "class"])
    assert row.loc[("strong", "red"), "effect"] == pytest.approx(1 - 5 / 8)
    assert row.loc[("strong", "blue"), "effect"] == pytest.approx(1 - 2 / 8)
    assert row.loc[("strong", "blue"), "base_rate"] == pytest.approx(2 / 8)
    assert row.loc[("strong", ALL_CLASSES), "effect"] == pytest.approx((3 / 8 + 6 / 8) / 2)
    assert row.loc[("strong", "blue"), "prob_shift"] == pytest.approx(5 / 7)  # undecided: NaN
    assert (row.loc["none", ["effect", "ci_low", "ci_high"]] == 0).all().all()
    assert (table["n"] == 8).all()
    assert ((table["ci_low"] <= table["effect"]) & (table["effect"] <= table["ci_high"])).all()
    assert (row.loc["strong", "ci_low"] < row.loc["strong", "ci_high"]).all()
    assert table.equals(effects(base, steered, CLASSES, seed=0))  # seeded
    scrambled = steered.assign(index=steered["index"].where(steered["index"] != 3, 9))
    with pytest.raises(ValueError, match="not the base images' seeds"):
        effects(base, scrambled, CLASSES, seed=0)


def test_the_bootstrap_interval_covers_the_mean_at_about_95_percent():
    rng = np.random.default_rng(1)
    resamples = rng.integers(0, 40, (BOOTSTRAP, 40))
    covered = 0
    for _ in range(200):  # true mean shift 0.3: each image moves with probability 0.3
        shift = (rng.random(40) < 0.3).astype(float)
        low, high = bootstrap_interval(shift, resamples)
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99
    five = rng.integers(0, 5, (BOOTSTRAP, 5))
    assert bootstrap_interval(np.full(5, 0.5), five) == (0.5, 0.5)
    assert np.isnan(bootstrap_interval(np.full(5, np.nan), five)).all()
    low, high = bootstrap_interval(np.array([1.0, np.nan, 1.0, 0.0, np.nan]), five)
    assert 0 <= low < 2 / 3 < high <= 1  # NaN images are left out of each mean


def map_table(effect_by_layer: dict[str, tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"window": STEERING, "layer": name, "kind": kind, "class": ALL_CLASSES,
                          "effect": effect, "ci_low": effect - 0.1, "ci_high": effect + 0.1,
                          "prob_shift": effect} for name, (kind, effect) in
                         effect_by_layer.items()])


def test_rank_by_causal_selects_the_layers_with_the_largest_effect(tiny):
    _, registry, _ = tiny("toy")
    attn1, attn2 = registry.names("attn1"), registry.names("attn2")
    effect = {name: ("attn1", 0.1 * i) for i, name in enumerate(attn1)}
    effect |= {attn2[0]: ("attn2", 0.95)}  # the largest of all, but not of the ranked kind
    scores = pd.DataFrame({"layer": attn1, "kind": "attn1", "step": 5,  # separability: reversed
                           "balanced_accuracy": np.linspace(1, 0.3, len(attn1))})
    table = map_table(effect)
    by_effect = LayerSelection("auto", "attn1", 3, range(0, 10), rank_by="causal")
    chosen = [layer.name for layer in by_effect.resolve(registry, scores, table)]
    assert chosen == attn1[::-1][:3]
    assert list(rank_effects(table)["layer"][:2]) == [attn2[0], attn1[-1]]
    by_separability = replace(by_effect, rank_by="separability")
    assert [layer.name for layer in by_separability.resolve(registry, scores, table)] == attn1[:3]
    with pytest.raises(UserError, match="run the causal stage"):
        by_effect.resolve(registry, scores)


@pytest.mark.parametrize("overrides,message", [
    (["layers.rank_by=influence"], "layers.rank_by='influence' is not valid; choose one of "
                                   "['separability', 'causal']"),
    (["causal.n_images=0"], "causal.n_images=0 must be an integer >= 1"),
    (["causal.start=0.8", "causal.end=0.5"], "causal.start=0.8 must be below causal.end=0.5"),
    (["stages=[causul]"], "stages=['causul'] is not valid"),
])
def test_bad_causal_settings_are_refused_at_validation(overrides, message):
    with pytest.raises((ConfigError, HydraException)) as error:  # choices: at composition
        validate(make_config("model=toy", "concept=color", *overrides))
    assert message in error_line(error.value)


def test_named_layers_inside_the_auto_group_need_no_causal_map(tmp_path):
    """`layers.select=[...]` keeps the auto group's rank_by=causal: the layers are steered as
    named and no map is computed (steer does not ask for the causal stage)."""
    cfg = make_config("model=toy", "concept=color", "layers.rank_by=causal",
                      "layers.select=[up_blocks.1.attentions.0.transformer_blocks.0.attn1]")
    validate(cfg)
    assert "causal" not in Run(cfg, tmp_path / "run").needs("steer")


def test_causal_window_follows_steer_but_not_its_strength():
    """The map depends on the window; its strength is its own, so an alpha sweep shares one
    map (and alpha 0 cannot make the ranking arbitrary)."""
    cfg = make_config("model=toy", "concept=color", "steer.alpha=7", "steer.start=0.5", "seed=3")
    validate(cfg)
    assert (cfg.causal.alpha, cfg.causal.start, cfg.causal.end, cfg.causal.seed) == (
        16.0, 0.5, None, 3)


def test_thirds_partition_the_steps():
    windows = step_windows(CausalConfig(start=0.3, thirds=True), 20)
    assert windows == {STEERING: range(6, 20), "early": range(0, 7), "middle": range(7, 13),
                       "late": range(13, 20)}
    assert list(step_windows(CausalConfig(), 20)) == [STEERING]


def test_batch_rows_keep_a_layers_rows_and_zero_the_others():
    vectors = torch.arange(1, 7, dtype=torch.float32)[:, None, None].expand(6, 2, 3)
    edit = AddVector("layer", vectors.clone(), start=1, end=2)
    batch = batch_rows(edit, offset=4, first=8, stop=12)  # this layer's samples 4..9
    assert batch.vectors.shape == (4, 2, 3) and (batch.start, batch.end) == (1, 2)
    assert batch.vectors[:, 0, 0].tolist() == [5, 6, 0, 0]


def test_steered_rows_continue_from_their_images_cached_prefix(tiny, tmp_path):
    """Samples that repeat images (as the map's layers and classes do) start from those images'
    cached latents: untouched ones come out as their base image, and the prefix is not
    computed again."""
    pipe, registry, spec = tiny("toy")
    steps, start = 5, 2
    generator = Generator(pipe, registry, replace(spec, steps=steps, batch_size=2))
    prompts, seeds = ["a circle", "a square", "a triangle"], [11, 12, 13]
    prefix = Prefix(tmp_path, start)
    base = generator.all(prompts, seeds, prefix=prefix)  # writes the prefix, 2 batches
    rows = (2, 0, 2, 1)
    layer = registry.names("attn1")[0]
    vectors = torch.zeros(len(rows), registry[layer].width)
    vectors[2] = 30.0  # the second copy of image 2 is steered
    calls = generator.calls
    images, _ = generator.batch([prompts[r] for r in rows], [seeds[r] for r in rows],
                                [AddVector(layer, vectors, start=start)],
                                prefix=PrefixRows(prefix, rows, 2, len(prompts)))
    assert generator.calls - calls == steps - start
    pixels = [np.asarray(image, dtype=int) for image in images]
    for image, row in zip((pixels[0], pixels[1], pixels[3]), (2, 0, 1), strict=True):
        assert np.abs(image - np.asarray(base[row], dtype=int)).max() <= 1
    assert np.abs(pixels[2] - pixels[0]).max() > 10


def test_naive_count():
    assert naive_calls(21, 4, 32, 20, 1) == 21 * 4 * 32 * 20


# -- end to end on the toy world ---------------------------------------------------------------

TINY = ["model=toy", "concept=color", "labeler=oracle", "model.steps=6", "collect.n_images=64",
        "causal.n_images=2", "causal.thirds=true", "eval.n_images_per_prompt=2", "layers.k=2"]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """collect, localize, the causal map (with thirds) and steering by it, once on a small toy
    run."""
    root = tmp_path_factory.mktemp("causal")
    cfg = make_config(f"paths.root={root}", *TINY, "stages=[collect,localize,causal,steer]",
                      "layers.rank_by=causal")
    results = run(cfg, root / "run")
    return root, results


@pytest.mark.slow
def test_the_map_covers_every_layer_and_class_and_costs_less_than_naive(mapped):
    root, results = mapped
    causal_map = results["causal"]
    table, meta = causal_map.table, causal_map.meta
    assert len(meta["layers"]) == 21  # the toy's 10 attn1, 10 attn2 and its bottleneck
    assert len(table) == 4 * 21 * (4 + 1)  # windows x layers x (classes + mean)
    assert meta["windows"] == {STEERING: [1, 6], "early": [0, 2], "middle": [2, 4],
                               "late": [4, 6]}
    assert set(table["class"]) == {"red", "green", "blue", "yellow", ALL_CLASSES}
    assert (table.groupby("kind")["layer"].nunique().to_dict()
            == {"attn1": 10, "attn2": 10, "bottleneck": 1})
    assert ((table["ci_low"] <= table["effect"]) & (table["effect"] <= table["ci_high"])).all()
    assert (table["n"] == 2).all()
    # Base images: 1 batch x 6 steps, writing the prefix at step 1; 21 x 4 x 2 = 168 steered
    # samples a window: 3 batches, each continuing from its window's start. The early third
    # starts at step 0 (no prefix); the middle and late ones first cache theirs (6 calls each).
    windows = 6 + 3 * 5 + 3 * 6 + (6 + 3 * 4) + (6 + 3 * 2)
    assert meta["denoiser_calls"] == windows < meta["naive_calls"] == 21 * 4 * 2 * 6 * 4
    assert meta["plan"]["start"] == 1 and meta["plan"]["method"] == "icm"
    for name in ("causal.png", "causal_vs_separability.png", "causal_windows.png", "causal.csv",
                 "manifest.json"):
        assert (causal_map.root / name).stat().st_size > 0
    assert (root / "run" / "causal").resolve() == causal_map.root.resolve()


@pytest.mark.slow
def test_rank_by_causal_steers_the_layers_with_the_largest_effect(mapped):
    root, results = mapped
    table = results["causal"].table
    expected = rank_effects(table[table["kind"] == "attn1"])["layer"][:2]
    assert results["steer"].plan.layers == list(expected)
    selected = json.loads((root / "run" / "selected_layers.json").read_text())
    assert selected["layers"] == list(expected) and selected["rank_by"] == "causal"


@pytest.mark.slow
def test_the_map_is_reused(mapped):
    root, results = mapped
    again = Run(make_config(f"paths.root={root}", *TINY, "stages=[causal]"), root / "again")
    reused = again.result("causal")
    assert again.denoiser_calls["causal"] == 0
    pd.testing.assert_frame_equal(reused.table, results["causal"].table)
