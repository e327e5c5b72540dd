from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from icm_lab.app.runner import run
from icm_lab.app.validation import validate
from icm_lab.config.schema import LocalizeConfig, section
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.core.layers import UnknownLayerError
from icm_lab.core.selection import LayerSelection, rank_layers, step_window
from icm_lab.io.artefacts import ArtefactMismatchError, Provenance, seal
from icm_lab.io.store import ActivationStore, StoreWriter
from icm_lab.probing.probes import Probe, fit_probes, scores, targets
from icm_lab.probing.probeset import ProbeSet
from icm_lab.probing.splits import fold_indices, split_indices
from icm_lab.stages.localize import localize, localize_provenance
from icm_lab.stages.resources import Resources
from tests.conftest import make_config

PLANTED = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def planted_batch(P=6, N=600, W=48, n_classes=2, seed=0, strength=1.5):
    """Isotropic noise plus a class-dependent shift along one direction per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (N,), generator=g)
    directions = torch.nn.functional.normalize(torch.randn(n_classes, W, generator=g), dim=1)
    x = torch.randn(P, N, W, generator=g) + strength * directions[y][None]
    return x, y, directions


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logreg_agrees_with_sklearn(n_classes):
    x, y, _ = planted_batch(n_classes=n_classes, strength=torch.linspace(0, 1, 6)[:, None, None])
    train, test = np.arange(0, 480), np.arange(480, 600)
    results = {}
    for backend in ("logreg", "sklearn"):
        fit = fit_probes(backend, x[:, train], y[train], n_classes)
        results[backend] = (fit, scores(fit.logits(x[:, test]), y[test], n_classes))
    (ours, our_scores), (ref, ref_scores) = results["logreg"], results["sklearn"]
    for key in ("balanced_accuracy", "accuracy", "auroc"):
        assert (our_scores[key] - ref_scores[key]).abs().mean() <= 0.02, key
    cos = torch.nn.functional.cosine_similarity(ours.directions(n_classes),
                                                ref.directions(n_classes), dim=-1)
    assert cos[1:].min() > 0.95  # probe 0 has no signal: its direction is noise for both


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logreg_reaches_the_optimum(n_classes):
    """At the returned probes the objective's gradient, recomputed here in float64, is within
    the tolerance: the solver stops at the optimum, not merely when it has stalled."""
    x, y, _ = planted_batch(n_classes=n_classes, strength=torch.linspace(0, 2, 6)[:, None, None])
    fit = fit_probes("logreg", x, y, n_classes, C=0.5, tol=1e-4)
    z = ((x - fit.mean[:, None]) / fit.scale[:, None]).double()
    w, b = fit.weight.double(), fit.bias.double()
    residual = torch.sigmoid(z @ w + b[:, None]) - targets(y, n_classes).double()
    n = len(y)
    grad_w = z.transpose(1, 2) @ residual / n + w / (0.5 * n)
    grad_b = residual.mean(dim=1)
    assert max(grad_w.abs().max(), grad_b.abs().max()) < 2e-4  # float32 rounding on top of tol


def test_logreg_reports_probes_that_did_not_converge(caplog):
    x, y, _ = planted_batch(strength=torch.linspace(0, 2, 6)[:, None, None])
    with caplog.at_level("WARNING", logger="icm_lab.probing.probes"):
        fit_probes("logreg", x, y, 2)
        assert not caplog.records
        fit_probes("logreg", x, y, 2, max_iter=2)
    assert "6 of 6 probes did not reach tol=0.0001 within max_iter=2" in caplog.text


def test_logreg_is_independent_of_chunking_workers_and_input_precision():
    x, y, _ = planted_batch(P=5, strength=torch.linspace(0, 2, 5)[:, None, None])
    x = x.half()
    whole = fit_probes("logreg", x, y, 2, chunk_mb=float("inf"))
    for fit in (fit_probes("logreg", x, y, 2, chunk_mb=1e-6),  # one probe per chunk
                fit_probes("logreg", x, y, 2, chunk_mb=1e-6, workers=3),  # threads share them
                fit_probes("logreg", x.float(), y, 2, workers=1)):
        for name in ("mean", "scale", "weight", "bias"):
            torch.testing.assert_close(getattr(fit, name), getattr(whole, name),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", [{"C": 0.0}, {"C": float("nan")}, {"tol": -1e-3},
                                    {"max_iter": 0}, {"max_iter": 2.5}])
def test_bad_probe_options_are_refused(option):
    x, y, _ = planted_batch(P=1)
    with pytest.raises(ValueError, match=f"probe.{next(iter(option))}=.* must be"):
        fit_probes("logreg", x, y, 2, **option)


@pytest.mark.parametrize("backend", ["logreg", "sklearn", "mean_diff"])
def test_backends_recover_planted_directions(backend):
    x, y, planted = planted_batch(n_classes=3, N=1500, W=32, strength=3.0)
    fit = fit_probes(backend, x[:, :1200], y[:1200], 3)
    directions = fit.directions(3)  # [P, K, W]
    # One-vs-rest: class k's direction points from the mean of the other classes to k's.
    others = (planted.sum(0, keepdim=True) - planted) / 2
    expected = torch.nn.functional.normalize(planted - others, dim=1)
    cos = torch.nn.functional.cosine_similarity(directions, expected[None], dim=-1)
    assert cos.min() >= 0.85  # the C = 1 optimum itself: 0.90 to 0.94 per step at tol 1e-4
    assert scores(fit.logits(x[:, 1200:]), y[1200:], 3)["balanced_accuracy"].min() > 0.8


def test_scores_match_sklearn_metrics():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, 1, generator=g)
    y = torch.randint(0, 2, (50,), generator=g)
    ours = scores(logits, y, 2)
    for p in range(3):
        pred = (logits[p, :, 0] > 0).long().numpy()
        assert ours["balanced_accuracy"][p] == pytest.approx(balanced_accuracy_score(y, pred))
        assert ours["accuracy"][p] == pytest.approx(accuracy_score(y, pred))
        assert ours["auroc"][p] == pytest.approx(roc_auc_score(y, logits[p, :, 0]), abs=1e-6)
    multi = torch.randn(2, 60, 3, generator=g)
    y3 = torch.randint(0, 3, (60,), generator=g)
    ours = scores(multi, y3, 3)
    for p in range(2):
        pred = multi[p].argmax(1).numpy()
        assert ours["balanced_accuracy"][p] == pytest.approx(balanced_accuracy_score(y3, pred))
        ovr = np.mean([roc_auc_score(y3 == k, multi[p, :, k]) for k in range(3)])
        assert ours["auroc"][p] == pytest.approx(ovr, abs=1e-6)


def test_grouped_split_keeps_prompts_on_one_side():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    labels = rng.integers(0, 2, len(groups))
    train, test = split_indices(labels, groups, "prompt", 0.2, seed=3)
    assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([train, test])) == list(range(len(groups)))
    assert 0.1 < len(test) / len(groups) < 0.3
    again, _ = split_indices(labels, groups, "prompt", 0.2, seed=3)
    assert np.array_equal(train, again)
    other, _ = split_indices(labels, groups, "prompt", 0.2, seed=4)
    assert not np.array_equal(np.sort(train), np.sort(other))
    train, test = split_indices(labels, groups, "image", 0.2, seed=3)
    assert len(test) == 40 and set(groups[train]) & set(groups[test])


def test_split_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 images of each of at least 2 classes"):
        split_indices(np.zeros(10, int), np.arange(10), "prompt", 0.2, 0)
    with pytest.raises(ValueError, match="unknown split .person."):
        split_indices(np.arange(10) % 2, np.arange(10), "person", 0.2, 0)


@pytest.mark.parametrize("method", ["prompt", "image"])
def test_folds_test_every_image_once_and_group_by_prompt(method):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    labels = rng.integers(0, 2, len(groups))
    folds = fold_indices(labels, groups, method, 5, 0.2, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate([test for _, test in folds])) == list(range(len(groups)))
    for train, test in folds:
        assert sorted(np.concatenate([train, test])) == list(range(len(groups)))
        assert 0.1 < labels[test].mean() / labels.mean() < 1.9  # both classes in every fold
    shared = [bool(set(groups[train]) & set(groups[test])) for train, test in folds]
    assert not any(shared) if method == "prompt" else all(shared)
    again = fold_indices(labels, groups, method, 5, 0.2, seed=3)
    other = fold_indices(labels, groups, method, 5, 0.2, seed=4)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(folds, again, strict=True))
    assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(folds, other, strict=True))


def planted_store(root, registry, n=400, steps=10, seed=0) -> ActivationStore:
    """A store shaped like tiny_sd15's, with the label written into one layer from step 3 on."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    direction = rng.normal(size=registry[PLANTED].width)
    direction /= np.linalg.norm(direction)
    activations = {}
    for layer in registry:
        x = rng.normal(size=(n, steps, layer.width))
        if layer.name == PLANTED:
            x[:, 3:] += 2.0 * (2 * labels[:, None, None] - 1) * direction
        activations[layer.name] = x.astype(np.float16)
    samples = pd.DataFrame({"index": np.arange(n), "prompt_id": np.arange(n) % 20,
                            "prompt": [f"p{i % 20}" for i in range(n)], "seed": np.arange(n),
                            "label": np.where(labels == 1, "female", "male"),
                            "image": "", "p_male": 0.5, "p_female": 0.5})
    provenance = Provenance("collect", "tiny_sd15", "gender", "planted")
    writer = StoreWriter(root, provenance, list(registry), n)
    writer.write_batch(0, activations, samples)
    store = writer.finalize()
    store.planted_direction = direction
    return store


def planted_localize(tmp_path, tiny, *overrides):
    """The localize stage on a planted store, with the session's twin as its pipeline."""
    pipe, registry, _ = tiny("tiny_sd15")
    cfg = make_config(f"paths.root={tmp_path}", *overrides)
    res = Resources(cfg, tmp_path / "run", pipeline=pipe)
    store = planted_store(tmp_path / "store", registry)
    selection = LayerSelection("auto", "attn1", 3, step_window(0.3, None, store.n_steps),
                               "separability")

    def run_stage():
        return localize(res, section(cfg, "localize"), instantiate(cfg.probe), store,
                        selection, cfg.seed)

    return store, run_stage


def test_localize_ranks_the_planted_layer_first(tmp_path, tiny):
    store, localize_stage = planted_localize(tmp_path, tiny, "localize.folds=2")  # fast enough
    localization = localize_stage()
    probes = localization.probes
    assert localization.selected[0].name == PLANTED
    window = step_window(0.3, None, 10)
    ranking = rank_layers(probes.scores, window)
    assert ranking["layer"].iloc[0] == PLANTED
    assert ranking["balanced_accuracy"].iloc[0] > 0.95
    assert ranking["balanced_accuracy"].iloc[1] < 0.75
    female = probes.directions(PLANTED)[3:, 1].double().numpy()  # [steps, width]
    cos = female @ store.planted_direction
    assert cos.min() >= 0.85  # the C = 1 optimum itself: 0.90 to 0.94 per step at tol 1e-4
    assert np.allclose(probes.directions(PLANTED)[3:, 0], -probes.directions(PLANTED)[3:, 1])
    selected = (tmp_path / "run" / "selected_layers.json").read_text()
    assert PLANTED in selected
    for figure in ("layer_ranking.png", "localize/separability.png"):
        assert (tmp_path / "run" / figure).stat().st_size > 10_000
    assert len(pd.read_csv(probes.root / "scores.csv")) == 33 * 10


def by_hand(store, step, folds):
    """The mean_diff probe's balanced accuracy at the planted layer and `step` on each fold."""
    y = (store.samples["label"] == "female").to_numpy().astype(int)  # gender: [male, female]
    x = torch.from_numpy(store[PLANTED][:, step].astype(np.float32))[None]  # [1, N, W]
    result = []
    for train, test in folds:
        fit = fit_probes("mean_diff", x[:, train], torch.as_tensor(y[train]), 2)
        predicted = (fit.logits(x[:, test])[0, :, 0] > 0).long().numpy()
        result.append(balanced_accuracy_score(y[test], predicted))
    return np.array(result)


def planted_folds(store, folds):
    labels = (store.samples["label"] == "female").to_numpy().astype(int)
    return fold_indices(labels, store.samples["prompt_id"].to_numpy(), "prompt", folds, 0.2, 0)


def test_separability_is_the_mean_and_std_over_folds(tmp_path, tiny):
    store, localize_stage = planted_localize(tmp_path, tiny, "probe=mean_diff",
                                             "localize.folds=4")
    table = localize_stage().probes.scores
    assert (table["folds"] == 4).all()
    assert {"balanced_accuracy_std", "accuracy", "accuracy_std", "auroc_std"} <= set(table)
    planted = table[table["layer"] == PLANTED].set_index("step")
    for step in (1, 5):  # no signal yet; the label written in
        per_fold = by_hand(store, step, planted_folds(store, 4))
        assert planted.loc[step, "balanced_accuracy"] == pytest.approx(per_fold.mean())
        assert planted.loc[step, "balanced_accuracy_std"] == pytest.approx(per_fold.std(ddof=1))
    assert planted.loc[5, "balanced_accuracy"] > 0.95
    noise = table[table["layer"] != PLANTED]
    assert noise["balanced_accuracy_std"].between(0.005, 0.3).mean() > 0.9  # folds do differ


def test_one_fold_is_the_single_split_and_directions_use_every_image(tmp_path, tiny):
    store, localize_stage = planted_localize(tmp_path, tiny, "probe=mean_diff",
                                             "localize.folds=1")
    probes = localize_stage().probes
    planted = probes.scores[probes.scores["layer"] == PLANTED].set_index("step")
    labels = (store.samples["label"] == "female").to_numpy().astype(int)
    split = split_indices(labels, store.samples["prompt_id"].to_numpy(), "prompt", 0.2, 0)
    assert (planted["n_train"] == len(split[0])).all() and (planted["folds"] == 1).all()
    for step in (1, 5):
        assert planted.loc[step, "balanced_accuracy"] == pytest.approx(
            by_hand(store, step, [split])[0])
    assert planted["balanced_accuracy_std"].isna().all()
    every = fit_probes("mean_diff", torch.from_numpy(np.array(store[PLANTED])).transpose(0, 1),
                       torch.as_tensor(labels), 2)  # all images, not the training split
    torch.testing.assert_close(probes.directions(PLANTED, "mean_diff"), every.directions(2))


def test_more_folds_than_a_class_has_prompts_are_refused(tmp_path, tiny):
    _, localize_stage = planted_localize(tmp_path, tiny, "localize.folds=21")
    with pytest.raises(UserError) as refused:
        localize_stage()
    assert str(refused.value).startswith(
        "localize.folds=21 needs at least 21 prompts of each decided class (split=prompt); "
        "found {'female': 20, 'male': 20}")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_bad_folds_are_refused_at_validation(bad):
    with pytest.raises(ConfigError, match=rf"^localize.folds={bad} must be 1 \(one split of "
                                          r"localize.test_size\) or an integer >= 2 \(k-fold\)$"):
        validate(make_config(f"localize.folds={bad}"))


def test_the_localize_fingerprint_holds_the_folds():
    res = SimpleNamespace(model=SimpleNamespace(name="toy"), concept=SimpleNamespace(name="color"))
    store = SimpleNamespace(meta={"provenance": {"fingerprint": "collected"}})

    def fingerprint(**options):
        return localize_provenance(res, LocalizeConfig(**options), Probe("mean_diff"), store,
                                   0).fingerprint

    assert len({fingerprint(folds=5), fingerprint(folds=2), fingerprint(folds=1)}) == 3
    assert fingerprint(folds=5, test_size=0.3) == fingerprint(folds=5)  # unused by k folds
    assert fingerprint(folds=1, test_size=0.3) != fingerprint(folds=1)


def test_probe_artefacts_round_trip_and_refuse_mismatches(tmp_path, tiny):
    _, localize_stage = planted_localize(tmp_path, tiny, "probe=mean_diff")
    probes = localize_stage().probes
    again = ProbeSet(probes.root, expect=Provenance(**probes.meta["provenance"]))
    with safe_open(probes.root / ProbeSet.FILE, framework="pt") as f:  # one probe per step
        weight, mean = f.get_tensor(f"{PLANTED}/weight"), f.get_tensor(f"{PLANTED}/mean")
    assert weight.shape == (10, 32, 1) and mean.shape == (10, 32)  # up_blocks.1: 32 wide
    assert torch.equal(again.directions(PLANTED), probes.directions(PLANTED))
    pd.testing.assert_frame_equal(again.scores, probes.scores)
    wrong = Provenance(**(probes.meta["provenance"] | {"concept": "age"}))
    with pytest.raises(ArtefactMismatchError, match="concept: artefact has 'gender'"):
        ProbeSet(probes.root, expect=wrong)
    with pytest.raises(KeyError, match="no probes for layer"):
        again.directions("mid_blok")


def test_layer_selection(tiny):
    _, registry, _ = tiny("tiny_sd15")
    scores_table = pd.DataFrame([
        {"layer": layer.name, "kind": layer.kind, "step": step,
         "balanced_accuracy": 0.9 if layer.name == PLANTED and step >= 5 else 0.5}
        for layer in registry for step in range(10)
    ])
    late, early = range(5, 10), range(0, 5)

    def select(*overrides, window=late, scores=None):
        layers = section(make_config(*overrides), "layers")
        chosen = LayerSelection(layers.select, layers.kind, layers.k, window,
                                layers.rank_by).resolve(registry, scores)
        return [layer.name for layer in chosen]

    assert select("layers=auto", "layers.k=2", scores=scores_table)[0] == PLANTED
    assert PLANTED not in select("layers.k=1", window=early,
                                 scores=scores_table[scores_table.step < 5])
    for option, count in [("all_attn1", 16), ("all_attn2", 16), ("all", 33), ("bottleneck", 1),
                          ("paper_sd15", 3)]:
        assert len(select(f"layers={option}")) == count, option
    assert select(f"layers.select=[{PLANTED},mid_block]") == [PLANTED, "mid_block"]
    with pytest.raises(UnknownLayerError, match="Valid layers"):
        select("layers.select=[up_blocks.7.attn1]")
    with pytest.raises(UserError, match="run the localize stage"):
        select("layers=auto")


@pytest.mark.parametrize("bad", ["1.5", "nan", "-0.1"])
def test_steering_window_is_validated(bad):
    with pytest.raises(ValueError, match="must be a fraction in"):
        step_window(float(bad), None, 10)


@pytest.mark.slow
def test_localize_end_to_end_with_explicit_swap(tmp_path):
    cfg = make_config(f"paths.root={tmp_path}", "collect.n_images=30", "model.steps=4",
                      "localize.method=explicit_swap", "localize.swap_images=2")
    probes = run(cfg, tmp_path / "run")["localize"].probes
    assert set(probes.scores["step"]) == set(range(4))
    assert probes.scores["balanced_accuracy"].between(0, 1).all()
    assert (tmp_path / "run" / "layer_ranking.png").exists()
    swap = pd.read_csv(tmp_path / "run" / "explicit_swap.csv")
    assert len(swap) == 16 * 2 and swap["rate"].between(0, 1).all()
    assert set(swap["class"]) == {"male", "female"}
    assert (tmp_path / "run" / "explicit_swap.png").exists()


@pytest.mark.slow
def test_localize_end_to_end_on_sdxl_multiclass(tmp_path):
    """Real tiny_sdxl activations; the random tiny CLIP labels everything alike, so the labels
    are assigned by prompt here (as a labeler would) to give the probes three classes."""
    overrides = ["model=tiny_sdxl", "concept=age", f"paths.root={tmp_path}",
                 "collect.n_images=60", "model.steps=4", "probe=sklearn", "localize.split=image"]
    store = run(make_config(*overrides, "stages=[collect]"), tmp_path / "run")["collect"]
    samples = store.samples.assign(label=np.array(["young", "adult", "old"])[
        store.samples["prompt_id"] % 3])
    samples.to_parquet(store.root / "store" / "samples.parquet", index=False)
    seal(store.root)  # relabelled on purpose: else the reuse check takes it as damaged
    probes = run(make_config(*overrides, "stages=[localize]"),
                 tmp_path / "run")["localize"].probes
    assert probes.classes == ["young", "adult", "old"]
    assert probes.meta["provenance"]["model"] == "tiny_sdxl"
    layer = probes.layers[0]
    assert probes.directions(layer).shape[:2] == (4, 3)
    assert len(probes.scores) == len(store.layers) * 4


def test_localize_refuses_single_class_stores(tmp_path, tiny):
    store, localize_stage = planted_localize(tmp_path, tiny)
    store.samples["label"] = "male"
    with pytest.raises(UserError, match="'male': 400, 'female': 0"):
        localize_stage()
