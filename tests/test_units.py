"""Calibrated steering strength (`steer.units`): the sigma statistic, how it scales the added
vectors, the norm-matched random control and the refusal of a bad value."""

import numpy as np
import torch

from icm_lab.probeset import projection_std
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
