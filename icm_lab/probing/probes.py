"""Linear probes over many (layer, step) activations at once.

A *probe batch* is `X: [P, N, W]`: P probes (one per layer and step, all of width W) over the
same N samples. Every backend standardises each probe's features on the training split, then
fits one linear read-out per output: one for two classes, one-vs-rest per class for more.

- `logreg`: L2 logistic regression, all P probes fitted together by conjugate gradients with
  an exact line search per probe, in torch (CPU or GPU).
- `sklearn`: `StandardScaler` + `LogisticRegression`, one probe at a time: the parity reference.
- `mean_diff`: the difference of class means.

The objective is sklearn's: `C * sum(log-loss) + ||w||^2 / 2`, intercept not penalised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from icm_lab.core.errors import ConfigError, choices_error
from icm_lab.core.layers import LayerInfo

log = logging.getLogger(__name__)


@dataclass
class ProbeFit:
    """P fitted probes. `weight`/`bias` act on standardised features: z = (x - mean) / scale."""

    mean: torch.Tensor  # [P, W]
    scale: torch.Tensor  # [P, W]
    weight: torch.Tensor  # [P, W, O], O = 1 for two classes, else one per class
    bias: torch.Tensor  # [P, O]

    def rows(self, rows: slice) -> ProbeFit:
        """The probes `rows` of this batch (e.g. one layer's steps)."""
        return ProbeFit(self.mean[rows], self.scale[rows], self.weight[rows], self.bias[rows])

    @staticmethod
    def concat(fits: list[ProbeFit]) -> ProbeFit:
        return ProbeFit(*(torch.cat([getattr(f, name) for f in fits])
                          for name in ("mean", "scale", "weight", "bias")))

    @property
    def raw_weight(self) -> torch.Tensor:
        """`[P, W, O]`: the weights on raw activations, `w / scale`, i.e. each logit's gradient
        with respect to the raw activation."""
        return self.weight / self.scale[..., None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """`[P, n, O]` logits for `x: [P, n, W]` (any float dtype) in raw activation space."""
        raw = self.raw_weight
        offset = self.bias[:, None] - torch.bmm(self.mean[:, None], raw)
        return matvec(x.float(), raw) + offset

    def directions(self, n_classes: int) -> torch.Tensor:
        """`[P, K, W]` unit steering directions in raw activation space, one per class: each
        class's `raw_weight`; for two classes the single probe points to class 1, so class 0
        gets its negative."""
        raw = self.raw_weight.transpose(1, 2)  # [P, O, W]
        if n_classes == 2:
            raw = torch.cat([-raw, raw], dim=1)
        return torch.nn.functional.normalize(raw, dim=-1)


def targets(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`[n, O]` float targets: class 1 for two classes, one-vs-rest columns for more."""
    if n_classes == 2:
        return (y == 1).float()[:, None]
    return torch.nn.functional.one_hot(y, n_classes).float()


def standardised_chunks(x: torch.Tensor, chunk_mb: float | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`x: [P, N, W]` (any float dtype) in float32 chunks of whole probes, each standardised per
    probe and feature as StandardScaler does: yields `(z, mean, scale)`, `z = (x - mean) /
    scale`, scale 1 for constant features.

    Chunks are about `chunk_mb`: all at once on a GPU, 8 MB on the CPU, where a chunk being
    solved stays in cache and converts several times faster than all of x at once. `z` lives
    in a buffer that the next chunk overwrites (a fresh multi-MB block per chunk costs page
    faults), so use it before asking for the next."""
    if chunk_mb is None:
        chunk_mb = float("inf") if x.is_cuda else 8.0
    per_probe_mb = x[0].numel() * 4 / 2**20
    size = len(x) if chunk_mb == float("inf") else max(1, int(chunk_mb // per_probe_mb))
    buffer = torch.empty((min(size, len(x)), *x.shape[1:]), dtype=torch.float32, device=x.device)
    squares = torch.empty_like(buffer)
    averaging = buffer.new_full((len(buffer), 1, x.shape[1]), 1 / x.shape[1])
    for start in range(0, len(x), size):
        probes = x[start : start + size]
        z, average = buffer[: len(probes)].copy_(probes), averaging[: len(probes)]
        # Two passes (mean, then squared deviations) stay exact for large offsets. Sums over
        # the sample axis as matrix products read z once: far faster on the CPU than a
        # reduction over a middle axis.
        mean = torch.bmm(average, z)  # [p, 1, W]
        z.sub_(mean)
        std = torch.bmm(average, torch.mul(z, z, out=squares[: len(z)])).sqrt_()
        scale = torch.where(std > 0, std, torch.ones_like(std))
        yield z.div_(scale), mean[:, 0], scale[:, 0]


# -- backends --------------------------------------------------------------------------------


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
               max_iter: int = 300, tol: float = 1e-4, chunk_mb: float | None = None,
               workers: int | None = None) -> ProbeFit:
    """All P probes together by nonlinear conjugate gradients, each probe (and each one-vs-rest
    output) with its own exact line search, until every largest gradient entry is below `tol`.

    On the CPU, `workers` threads (default: torch's thread count) each fit a contiguous share of
    the probes with one torch thread. Solving is hundreds of small operations per chunk, and a
    team of OpenMP threads meets at a barrier after each: when another process holds a core,
    the whole team waits on it (3.6x slower than one thread at load 3 on 2 cores in a
    throwaway script; BENCHMARKS.md). Workers that never wait for each other degrade
    gracefully instead."""
    t = targets(y, n_classes)
    workers = 1 if x.is_cuda else max(1, min(workers or torch.get_num_threads(), len(x)))
    bounds = np.linspace(0, len(x), workers + 1).round().astype(int)
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def fit(part: slice) -> tuple[ProbeFit, int]:
        return _fit_logreg_part(x[part], t, C, max_iter, tol, chunk_mb)

    if workers == 1:
        results = [fit(parts[0])]
    else:
        with single_threaded(), ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(fit, parts))
    unconverged = sum(busy for _, busy in results)
    if unconverged:
        log.warning("logreg: %d of %d probes did not reach tol=%g within max_iter=%d; raise "
                    "probe.max_iter (or probe.tol)", unconverged, len(x), tol, max_iter)
    return ProbeFit.concat([fit for fit, _ in results])


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch at one intra-op thread for the block, then as before. The setting is the process's:
    not for blocks that overlap in several threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_logreg_part(x: torch.Tensor, t: torch.Tensor, C: float, max_iter: int, tol: float,
                     chunk_mb: float | None) -> tuple[ProbeFit, int]:
    """Consecutive probes, chunk by chunk: the fit, and how many probes missed `tol`."""
    fits, unconverged = [], 0
    for z, mean, scale in standardised_chunks(x, chunk_mb):
        theta, busy, _ = fit_logreg_chunk(z, t.to(z), C, max_iter, tol)
        fits.append(ProbeFit(mean, scale, theta[:, :-1], theta[:, -1]))
        unconverged += int(busy.any(dim=2).sum())
    return ProbeFit.concat(fits), unconverged


def fit_logreg_chunk(z: torch.Tensor, t: torch.Tensor, C: float, max_iter: int,
                      tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`theta = [w; b]`, `[P, W + 1, O]` (the unpenalised intercept last), minimising the mean
    loss + ||w||^2 / 2Cn (sklearn's objective / Cn) for standardised `z: [P, n, W]`; which
    probes and outputs, `[P, 1, O]`, had not converged after `max_iter` iterations; and how
    many iterations each took (`[P, 1, O]`, for the benchmark).

    Each iteration reads z twice (the gradient, then z @ gradient): margins are linear along
    the search direction, so the line search needs no further pass."""
    P, n, W = z.shape
    penalty = torch.full((W + 1, 1), 1 / (C * n), dtype=z.dtype, device=z.device)
    penalty[W] = 0

    def z_mv(theta: torch.Tensor) -> torch.Tensor:  # [P, n, O]
        return matvec(z, theta[:, :W]) + theta[:, W:]

    def z_rmv(r: torch.Tensor) -> torch.Tensor:  # [P, W + 1, O]
        return torch.cat([rmatvec(z, r), r.sum(dim=1, keepdim=True)], dim=1)

    theta = z.new_zeros(P, W + 1, t.shape[1])
    margin = z.new_zeros(P, n, t.shape[1])
    busy = torch.ones(P, 1, t.shape[1], dtype=torch.bool, device=z.device)
    iterations = torch.zeros(busy.shape, dtype=torch.long, device=z.device)
    direction, z_dir = torch.zeros_like(theta), torch.zeros_like(margin)
    previous = torch.zeros_like(theta)
    previous_norm = torch.full(busy.shape, float("inf"), dtype=z.dtype, device=z.device)
    for iteration in range(max_iter + 1):  # the last one only checks convergence
        residual = torch.sigmoid(margin) - t
        grad = z_rmv(residual) / n + theta * penalty
        busy &= grad.abs().amax(dim=1, keepdim=True) >= tol
        if iteration == max_iter or not busy.any():
            break
        iterations += busy
        z_grad, grad_norm = z_mv(grad), grad.square().sum(dim=1, keepdim=True)
        # Polak-Ribiere+, restarting (beta = 0) at the first iteration and where successive
        # gradients are far from orthogonal (Powell's test, at 0.5: 0.2 restarted too often on
        # the SD1.5-shaped benchmark; without restarts one toy probe took over 100 iterations)
        overlap = (grad * previous).sum(dim=1, keepdim=True)
        beta = ((grad_norm - overlap) / previous_norm.clamp_min(1e-30)).clamp_min(0)
        beta = torch.where(overlap.abs() >= 0.5 * grad_norm, 0.0, beta)
        direction, z_dir = beta * direction - grad, beta * z_dir - z_grad
        slope = (grad * direction).sum(dim=1, keepdim=True)
        uphill = slope >= 0  # restart on the steepest descent
        if uphill.any():
            direction = torch.where(uphill, -grad, direction)
            z_dir = torch.where(uphill, -z_grad, z_dir)
            slope = torch.where(uphill, -grad_norm, slope)
        previous, previous_norm = grad, grad_norm
        step = busy * _line_search(margin, residual + t, z_dir, t, slope,
                                   (penalty * direction * theta).sum(dim=1, keepdim=True),
                                   (penalty * direction.square()).sum(dim=1, keepdim=True))
        theta, margin = theta + step * direction, margin + step * z_dir
    return theta, busy, iterations


def _line_search(margin: torch.Tensor, p: torch.Tensor, z_dir: torch.Tensor, t: torch.Tensor,
                 slope: torch.Tensor, pen_dtheta: torch.Tensor, pen_dd: torch.Tensor
                 ) -> torch.Tensor:
    """The step `tau > 0` along a descent direction d towards the minimum of the convex
    phi(tau) = mean loss(margin + tau z_dir) + penalty(theta + tau d), per probe and output:
    one Newton step from 0, pulled back by the secant of phi' where it overshoots. `p` are the
    probabilities at tau = 0, `slope` = phi'(0), `pen_dtheta` = sum penalty * d * theta and
    `pen_dd` = sum penalty * d^2. Only slopes are compared: near the optimum, values of phi
    differ by less than float32 resolution."""
    curvature = ((p - p * p) * z_dir.square()).mean(dim=1, keepdim=True) + pen_dd
    newton = -slope / curvature.clamp_min(1e-30)
    slope_there = ((torch.sigmoid(margin + newton * z_dir) - t) * z_dir).mean(dim=1, keepdim=True)
    slope_there = slope_there + pen_dtheta + newton * pen_dd
    overshot = slope_there > 0  # the minimum lies in (0, newton): interpolate phi' linearly
    secant = newton * slope / (slope - slope_there).clamp_max(-1e-30)
    return torch.where(overshot, secant, newton)


def matvec(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`z @ v` per probe. On the CPU, torch's batched matrix-vector product takes a slow path
    (several times slower than 2-D products on cached data), so loop there."""
    if z.is_cuda:
        return torch.bmm(z, v)
    return torch.stack([zp @ vp for zp, vp in zip(z, v, strict=True)])


def rmatvec(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """`z^T @ r` per probe, computed as `(r^T z)^T` to read z row by row (the CPU's fast path)."""
    return torch.bmm(r.transpose(1, 2), z).transpose(1, 2)


def fit_sklearn(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
                max_iter: int = 300, tol: float = 1e-4) -> ProbeFit:
    """One probe at a time with scikit-learn: the parity reference for `fit_logreg`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    fits = []
    y_np = y.cpu().numpy()
    for probe in x.cpu().double().numpy():
        scaler = StandardScaler().fit(probe)
        model = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
        if n_classes > 2:
            model = OneVsRestClassifier(model)
        model.fit(scaler.transform(probe), y_np)
        estimators = model.estimators_ if n_classes > 2 else [model]
        weight = np.stack([e.coef_[0] for e in estimators], axis=1)  # [W, O]
        bias = np.array([e.intercept_[0] for e in estimators])
        fits.append((scaler.mean_, scaler.scale_, weight, bias))
    mean, scale, weight, bias = (torch.tensor(np.stack(a), dtype=torch.float32, device=x.device)
                                 for a in zip(*fits, strict=True))
    return ProbeFit(mean, scale, weight, bias)


def fit_mean_diff(x: torch.Tensor, y: torch.Tensor, n_classes: int,
                  chunk_mb: float | None = None, **_: object) -> ProbeFit:
    """Difference of class means (one-vs-rest), thresholded half-way between them."""
    t = targets(y, n_classes)  # [n, O]
    # Rows: the weights averaging each class, then each class's complement: [2O, n].
    averages = torch.cat([t / t.sum(0), (1 - t) / (1 - t).sum(0)], dim=1).T.to(x.device)
    fits = []
    for z, mean, scale in standardised_chunks(x, chunk_mb):
        class_means = torch.bmm(averages.expand(len(z), -1, -1), z)  # [P, 2O, W]
        positive, negative = class_means.transpose(1, 2).chunk(2, dim=2)  # [P, W, O] each
        weight = positive - negative
        fits.append(ProbeFit(mean, scale, weight, -(weight * (positive + negative) / 2).sum(1)))
    return ProbeFit.concat(fits)


BACKENDS = {"logreg": fit_logreg, "sklearn": fit_sklearn, "mean_diff": fit_mean_diff}


def check_options(backend: str, options: dict[str, object]) -> None:
    """Refuse an unknown backend, a non-positive or NaN C/tol/chunk_mb, a non-integer max_iter."""
    if backend not in BACKENDS:
        raise choices_error("probe.name", backend, sorted(BACKENDS))
    for key in ("C", "tol", "chunk_mb"):  # `not > 0` also refuses NaN
        if options.get(key) is not None and not (isinstance(options[key], int | float)
                                                 and options[key] > 0):
            raise ConfigError(f"probe.{key}={options[key]!r} must be a positive number")
    for key in ("max_iter", "workers"):
        value = options.get(key, 1)
        if not (value is None and key == "workers" or isinstance(value, int)
                and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"probe.{key}={value!r} must be a positive integer")


def fit_probes(backend: str, x: torch.Tensor, y: torch.Tensor, n_classes: int,
               **options: object) -> ProbeFit:
    """Fit `x: [P, N, W]` (any float dtype; fitted in float32) to labels `y: [N]`."""
    check_options(backend, options)
    return BACKENDS[backend](x, y, n_classes, **options)


def width_batches(layers: Sequence[LayerInfo], n: int, steps: int, batch_mb: float
                  ) -> list[list[LayerInfo]]:
    """Consecutive layers of equal width, as many per batch as fit in `batch_mb` of float32
    probes (`n` samples x `steps`): what one solver call fits together."""
    batches = []
    for _, same_width in groupby(layers, key=lambda layer: layer.width):
        batch: list[LayerInfo] = []
        for layer in same_width:
            size_mb = n * steps * layer.width * 4 / 2**20
            if batch and (len(batch) + 1) * size_mb > batch_mb:
                batches.append(batch)
                batch = []
            batch.append(layer)
        batches.append(batch)
    return batches


class Probe:
    """A probe config (`conf/probe/*.yaml`, through `_target_`): the backend, its options, and
    where and in what batches it fits."""

    def __init__(self, name: str, device: str = "auto", batch_mb: float = 1024,
                 workers: int | None = None, **options: object):
        """`options` decide the fit (and so the probe set's fingerprint); `device`, `batch_mb`
        and `workers` (logreg's CPU threads) only where and how fast it runs."""
        check_options(name, {**options, "workers": workers})
        if not (isinstance(batch_mb, int | float) and batch_mb > 0):
            raise ConfigError(f"probe.batch_mb={batch_mb!r} must be a positive number")
        self.name, self.device, self.batch_mb, self.options = name, device, batch_mb, options
        self.workers = workers

    def fit(self, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> ProbeFit:
        speed = {"workers": self.workers} if self.name == "logreg" else {}
        return fit_probes(self.name, x, y, n_classes, **self.options, **speed)


# -- scores ----------------------------------------------------------------------------------


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Class indices from `[P, n, O]` logits."""
    return (logits[..., 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(dim=-1)


def scores(logits: torch.Tensor, y: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """Balanced accuracy (mean recall over the classes present), accuracy and AUROC (macro
    one-vs-rest for more than two classes), each `[P]`."""
    pred = predict(logits)
    correct = (pred == y).float()
    present = [k for k in range(n_classes) if (y == k).any()]
    recall = torch.stack([correct[:, y == k].mean(dim=1) for k in present])
    if n_classes == 2:
        auroc = _auroc(logits[..., 0], y == 1)
    else:
        auroc = torch.stack([_auroc(logits[..., k], y == k) for k in present]).mean(dim=0)
    return {"balanced_accuracy": recall.mean(dim=0), "accuracy": correct.mean(dim=1),
            "auroc": auroc}


def _auroc(score: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mann-Whitney AUROC per row of `score: [P, n]`; NaN when one class is absent."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.full(score.shape[:1], float("nan"), device=score.device)
    ranks = score.argsort(dim=1).argsort(dim=1).to(score.dtype) + 1
    return (ranks[:, positive].sum(dim=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
