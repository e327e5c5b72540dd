"""Calibrated steering strength (`steer.units`): the sigma statistic, how it scales the added
vectors, the norm-matched random control and the refusal of a bad value."""

import numpy as np
import pytest
import torch
from hydra.errors import HydraException

from icm_lab.app.cli import error_line
from icm_lab.app.validation import validate
from icm_lab.probing.probeset import projection_std
from icm_lab.steering.methods import Icm, RandomDirections
from icm_lab.steering.plans import UNTOUCHED, SteerPlan, calibrated_edit
from tests.conftest import make_config
from tests.test_localize import PLANTED, planted_localize


def test_projection_std_is_the_std_of_the_projections():
    rng = np.random.default_rng(0)
    spread = np.array([1.0, 4.0, 0.5])[:, None]  # per step
    x = (rng.normal(size=(50, 3, 8)) * spread + 100.0).astype(np.float16)
    d = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(3, 2, 8))), dim=-1)
    expected = np.stack([(x[:, s].astype(np.float64) @ d[s].double().numpy().T).std(axis=0)
                         for s in range(3)])  # numpy's default: ddof 0
    assert np.allclose(projection_std(x, d).numpy(), expected, rtol=1e-6)
    assert expected[1].min() > 3 * expected[0].max()  # the scale of each step shows


def test_localize_stores_the_sigma_of_both_directions(tmp_path, tiny):
    store, localize_stage = planted_localize(tmp_path, tiny, "probe=logreg")
    probes = localize_stage().probes
    x = store[PLANTED].astype(np.float64)  # [N, S, W]
    for source in ("probe", "mean_diff"):
        d = probes.directions(PLANTED, source).double().numpy()  # [S, K, W]
        expected = np.einsum("nsw,skw->nsk", x, d).std(axis=0)
        sigma = probes.sigmas(PLANTED, source).numpy()
        assert sigma.shape == expected.shape == (10, 2)
        assert np.allclose(sigma, expected, rtol=1e-5)
        # the planted label adds +-2 along the direction from step 3 on: a wider spread there
        assert sigma[3:].min() > 1.5 * sigma[:3].max()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny):
    """A probe set fitted on the planted store, and the twin's layer registry."""
    _, localize_stage = planted_localize(tmp_path_factory.mktemp("units"), tiny)
    return localize_stage().probes, tiny("tiny_sd15")[1]


def test_sigma_units_scale_the_added_vector_per_layer(planted):
    probes, registry = planted
    noise = next(name for name in probes.layers if name != PLANTED)
    edits = [calibrated_edit(probes, name, "mean_diff", "sigma") for name in (PLANTED, noise)]
    targets = [0, 1, UNTOUCHED]
    plan = SteerPlan(method="icm", alpha=2.0, start=0, end=None, halves="cond", renorm=False,
                     direction="mean_diff", probe_set=None, classes=probes.classes,
                     prompts=[""] * 3, seeds=[0] * 3, targets=targets, model={},
                     units="sigma", edits=edits)
    for edit, added in zip(edits, plan.interventions(), strict=True):
        sigma = probes.sigmas(edit.layer, "mean_diff")  # [S, K]
        d = probes.directions(edit.layer, "mean_diff")
        for row, k in enumerate(targets[:2]):
            assert torch.allclose(added.vectors[row], 2.0 * sigma[:, k, None] * d[:, k])
        assert not added.vectors[2].any()  # untouched
    # the same alpha is a larger vector where the activations spread more along d
    late = [e.vectors(2.0)[5:].norm(dim=-1) for e in edits]
    assert (late[0] > 1.5 * late[1]).all()
    raw = calibrated_edit(probes, PLANTED, "mean_diff", "raw").vectors(2.0)
    assert torch.allclose(raw.norm(dim=-1), torch.full((10, 2), 2.0))


@pytest.mark.parametrize("units", ["raw", "sigma"])
def test_the_random_direction_is_fixed_over_steps_and_matched_in_norm(planted, units):
    probes, registry = planted
    layer = registry[PLANTED]
    edit = RandomDirections().edit(layer, probes, "probe", units, 10, 2, seed=3, index=1)
    assert torch.equal(edit.directions, edit.directions[:1].expand(10, -1, -1))
    assert not torch.allclose(edit.directions[0, 0], edit.directions[0, 1])  # one per class
    icm = Icm().edit(layer, probes, "probe", units, 10, 2, seed=3, index=1)
    assert torch.allclose(edit.vectors(4.0).norm(dim=-1), icm.vectors(4.0).norm(dim=-1))
    again = RandomDirections().edit(layer, probes, "probe", units, 10, 2, seed=3, index=1)
    other = RandomDirections().edit(layer, probes, "probe", units, 10, 2, seed=4, index=1)
    assert torch.equal(again.directions, edit.directions)  # seeded
    assert not torch.allclose(other.directions, edit.directions)


def test_a_bad_units_value_is_refused_in_one_line():
    with pytest.raises(HydraException) as refused:  # a choice: refused when composed
        validate(make_config("steer.units=std"))
    assert error_line(refused.value) == ("steer.units='std' is not valid; choose one of "
                                         "['raw', 'sigma']")
