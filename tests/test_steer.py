import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from icm_lab.app.replay import regenerate
from icm_lab.app.runner import run
from icm_lab.config.schema import SteerConfig
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.selection import step_window
from icm_lab.engine.hooks import DenoiserHooks
from icm_lab.probing.probes import ProbeFit
from icm_lab.probing.probeset import ProbeSet
from icm_lab.stages.steer import SteerResult
from icm_lab.steering.plans import (
    UNTOUCHED,
    LayerEdit,
    SteerPlan,
    assign_targets,
    largest_remainder,
)
from tests.conftest import make_config

SMALL = ["collect.n_images=40", "model.steps=8", "eval.n_images_per_prompt=4"]


@pytest.mark.parametrize("n,target,expected", [
    (7, [0.5, 0.5], [4, 3]),
    (10, [0.7, 0.3], [7, 3]),
    (8, [1 / 3] * 3, [3, 3, 2]),
    (9, [0.25] * 4, [3, 2, 2, 2]),
    (5, [0.1, 0.2, 0.3, 0.4], [1, 1, 1, 2]),  # remainders 0.5 and 0.5: the earlier class
    (3, [1.0, 0.0], [3, 0]),
])
def test_target_counts_are_exact(n, target, expected):
    assert list(largest_remainder(n, np.array(target))) == expected
    targets = assign_targets(n, np.array(target), seed=5)
    assert list(np.bincount(targets, minlength=len(target))) == expected
    assert np.array_equal(targets, assign_targets(n, np.array(target), seed=5))  # seeded


def test_minimal_policy_steers_only_what_is_needed():
    base = np.array([0, 0, 0, 0, 0, 0, 1, 1, -1, 0])  # 7 of class 0, 2 of class 1, 1 undecided
    targets = assign_targets(10, np.array([0.5, 0.5]), seed=0, policy="minimal", base=base)
    untouched = targets == UNTOUCHED
    assert untouched.sum() == 5 + 2  # five class-0 and both class-1 images stay as they are
    assert set(base[untouched]) == {0, 1}
    assert np.bincount(targets[~untouched], minlength=2).tolist() == [0, 3]
    final = np.where(untouched, base, targets)
    assert np.bincount(final, minlength=2).tolist() == [5, 5]


def test_alpha_must_be_finite():
    for alpha in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match="steer.alpha=.* must be a finite number"):
            SteerConfig(alpha=alpha)


def add_vectors(probes, layers, targets, window, alpha):
    """The AddVectors of an ICM plan with the probes' own (w / scale) directions."""
    plan = SteerPlan(method="icm", alpha=alpha, start=window.start, end=window.stop,
                     halves="cond", renorm=False, direction="probe", probe_set=None,
                     classes=probes.classes, prompts=[""] * len(targets),
                     seeds=[0] * len(targets), targets=[int(t) for t in targets], model={},
                     edits=[LayerEdit(name, probes.directions(name, "probe")) for name in layers])
    return plan.interventions()


@pytest.fixture(scope="module")
def localized(tmp_path_factory):
    """collect + localize once on tiny_sd15, shared by the steering tests."""
    root = tmp_path_factory.mktemp("lab")
    cfg = make_config(f"paths.root={root}", *SMALL, "stages=[collect,localize]")
    results = run(cfg, root / "localize_run")
    return root, results["localize"].probes


def steer_run(root, name, *overrides) -> SteerResult:
    cfg = make_config(f"paths.root={root}", *SMALL, "stages=[steer]", *overrides)
    return run(cfg, root / name)["steer"]


@pytest.mark.slow
def test_steering_moves_the_probe_logit_towards_the_target(localized, tiny):
    root, probes = localized
    pipe, registry, _ = tiny("tiny_sd15")
    layer = probes.scores.groupby("layer")["balanced_accuracy"].mean().idxmax()
    window = step_window(0.3, None, 8)
    targets = np.array([0, 1, 0, 1])
    edits = add_vectors(probes, [layer], targets, window, 15.0)
    prompts = ["a photo of a person"] * 4

    def record(edits):
        generators = [torch.Generator().manual_seed(i) for i in range(4)]
        with DenoiserHooks(pipe, registry, record=[layer], interventions=edits) as hooks:
            pipe(prompts, generator=generators, num_inference_steps=8, height=64, width=64,
                 output_type="latent")
        return torch.from_numpy(hooks.recording()[layer]).float()  # [4, 8, W]

    base, steered = record([]), record(edits)
    with safe_open(probes.root / ProbeSet.FILE, framework="pt") as f:  # one probe per step
        fit = ProbeFit(*(f.get_tensor(f"{layer}/{key}") for key in ("mean", "scale", "weight",
                                                                    "bias")))
    logit = {name: fit.logits(x.transpose(0, 1))[..., 0] for name, x in
             (("base", base), ("steered", steered))}  # [steps, 4]: evidence for class 1
    shift = logit["steered"] - logit["base"]
    assert torch.equal(shift[: window.start], torch.zeros_like(shift[: window.start]))
    towards = torch.where(torch.from_numpy(targets) == 1, shift, -shift)[window.start :]
    assert (towards > 0).all(), towards


@pytest.mark.slow
def test_untouched_samples_are_bit_identical_to_base(localized):
    root, _ = localized
    result = steer_run(root, "minimal", "steer.policy=minimal")
    table = result.table
    untouched = table[~table["steered"]]
    assert len(untouched) > 0 and table["steered"].any()
    for _, row in untouched.iterrows():
        base = np.asarray(Image.open(result.base_root / row["base_image"]))
        steered = np.asarray(Image.open(result.steered_root / row["image"]))
        assert np.array_equal(base, steered)
        assert row["label"] == row["base_label"]
    for _, row in table[table["steered"]].iterrows():
        base = np.asarray(Image.open(result.base_root / row["base_image"]))
        assert not np.array_equal(base, np.asarray(Image.open(result.steered_root / row["image"])))


@pytest.mark.slow
@pytest.mark.parametrize("method,n_layers", [
    ("icm", 3), ("attn2", 3), ("all_layers", 32), ("hspace", 1), ("random", 3), ("prompt", 0),
    ("none", 0),
])
def test_every_method_runs_and_reuses_base_images(localized, method, n_layers):
    root, _ = localized
    result = steer_run(root, f"method_{method}", f"method={method}")
    assert len(result.plan.layers) == n_layers
    assert result.plan.method == method
    assert (result.plan.alpha is None) == (n_layers == 0)  # no vector added, no strength
    table = result.table
    assert len(table) == 12 * 4
    counts = table.groupby("prompt_id")["target"].value_counts().unstack()
    assert (counts["male"] == 2).all() and (counts["female"] == 2).all()
    assert table["steered"].all() == (method != "none")
    if method == "attn2":
        assert all(name.endswith("attn2") for name in result.plan.layers)
    assert len(list((result.steered_root / "grids").glob("*.png"))) == 12
    bases = [p for p in (root / "outputs" / "artefacts" / "base").iterdir() if p.is_dir()]
    assert len(bases) == 1  # one base set, shared by every method


@pytest.mark.slow
def test_multiclass_targets_follow_the_configured_distribution(localized, tmp_path):
    root, _ = localized
    cfg = make_config(f"paths.root={root}", *SMALL, "stages=[steer]", "method=prompt",
                      "concept=race", "concept.target=[0.5,0.25,0.25,0]",
                      "eval.n_images_per_prompt=4")
    table = run(cfg, tmp_path / "race")["steer"].table
    counts = table.groupby("prompt_id")["target"].value_counts().unstack(fill_value=0)
    assert (counts["white"] == 2).all() and (counts["black"] == 1).all()
    assert "indian" not in counts
    assert table["prompt"].str.contains(", ").sum() == 0  # the table keeps the original prompt
    plan = SteerPlan.load(tmp_path / "race" / "steer" / "plan.json")
    suffixes = (", a White person", ", a Black person", ", an East Asian person")
    assert all(p.endswith(suffixes) for p in plan.prompts), plan.prompts[:4]


@pytest.mark.slow
def test_steps_before_the_window_are_untouched(localized, tiny):
    _, probes = localized
    pipe, registry, _ = tiny("tiny_sd15")
    window = step_window(0.5, None, 8)
    edits = add_vectors(probes, [probes.layers[0]], [1, 0], window, 20.0)

    def record(edits):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        with DenoiserHooks(pipe, registry, record=registry.names(), interventions=edits) as h:
            pipe(["a", "b"], generator=generators, num_inference_steps=8, height=64, width=64,
                 output_type="latent")
        return h.recording()

    base, steered = record([]), record(edits)
    for name in registry.names():
        assert np.array_equal(base[name][:, : window.start], steered[name][:, : window.start])
    assert not np.array_equal(base[probes.layers[0]][:, window.start :],
                              steered[probes.layers[0]][:, window.start :])


def test_steering_unrecorded_layers_is_refused_before_collecting(tmp_path):
    cfg = make_config(f"paths.root={tmp_path}", *SMALL, "collect.record=[attn2]",
                      "layers=paper_sd15")
    with pytest.raises(ConfigError, match="steers .*mid_block.attentions.0.* which "
                                          "collect.record=\\['attn2'\\] does not record"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_probes_from_another_concept_are_refused(localized, tmp_path):
    root, probes = localized
    cfg = make_config(f"paths.root={root}", *SMALL, "stages=[steer]", "concept=age",
                      f"steer.probes={probes.root}")
    with pytest.raises(UserError, match="made for concept 'gender'.*steers concept 'age'"):
        run(cfg, tmp_path / "run")


@pytest.mark.slow
def test_nan_alpha_fails_before_generating(localized, tmp_path):
    root, _ = localized
    with pytest.raises(ConfigError, match="steer.alpha=nan must be a finite number"):
        run(make_config(f"paths.root={root}", *SMALL, "stages=[steer]", "steer.alpha=nan"),
            tmp_path / "run")
    assert not (tmp_path / "run" / "steer").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,units", [("icm", "raw"), ("random", "sigma")])
def test_the_saved_plan_replays_the_steered_images_bit_for_bit(localized, method, units):
    root, probes = localized
    result = steer_run(root, f"replay_{method}", f"method={method}", f"steer.units={units}")
    plan = SteerPlan.load(result.steered_root / "plan.json")
    assert plan.method == method and plan.layers == result.plan.layers
    assert plan.units == units
    assert plan.probe_set == probes.meta["provenance"]["fingerprint"]
    for saved, made in zip(plan.edits, result.plan.edits, strict=True):
        assert torch.equal(saved.directions, made.directions)
        assert torch.equal(saved.scale, made.scale)
        assert torch.equal(saved.scale, torch.ones_like(saved.scale)) == (units == "raw")
    images = regenerate(plan)
    for index, image in enumerate(images):
        original = Image.open(result.steered_root / "images" / f"{index:06d}.png")
        assert np.array_equal(np.asarray(image), np.asarray(original)), index


@pytest.mark.slow
def test_a_sweep_computes_the_unsteered_prefix_once(localized):
    """The first run makes the base images and caches their first `start` steps; every later
    configuration with that start continues from the cache, and writes its count down."""
    root, _ = localized
    overrides = ("stages=[steer,evaluate]", "eval.n_images_per_prompt=2")  # a fresh base set
    cfg = make_config(f"paths.root={root}", *SMALL, *overrides)
    steps = cfg.model.steps
    batches = -(-len(cfg.concept.eval_prompts) * 2 // cfg.model.batch_size)
    start = step_window(cfg.steer.start, None, steps).start
    calls = []
    for alpha in (5, 15):
        run(make_config(f"paths.root={root}", *SMALL, *overrides, f"steer.alpha={alpha}"),
            root / f"sweep_{alpha}")
        metrics = json.loads((root / f"sweep_{alpha}" / "metrics.json").read_text())
        calls.append(metrics["denoiser_calls"])
    reused = {"collect": 0, "localize": 0}  # artefacts from the fixture's run
    assert calls[0] == {**reused, "steer": batches * steps + batches * (steps - start)}
    assert calls[1] == {**reused, "steer": batches * (steps - start)}
