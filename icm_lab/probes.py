"""Linear probes over many (layer, step) activations at once.

A *probe batch* is `X: [P, N, W]`: P probes (one per layer and step, all of width W) over the
same N samples. Every backend standardises each probe's features on the training split, then
fits one linear read-out per output: one for two classes, one-vs-rest per class for more.

- `logreg`: L2 logistic regression, all P probes fitted together by accelerated gradient
  descent in torch (CPU or GPU), each probe with its own step size.
- `sklearn`: `StandardScaler` + `LogisticRegression`, one probe at a time: the parity reference.
- `mean_diff`: the difference of class means.

The objective is sklearn's: `C * sum(log-loss) + ||w||^2 / 2`, intercept not penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """`[P, n, O]` logits for `x: [P, n, W]` in raw activation space."""
        z = (x - self.mean[:, None]) / self.scale[:, None]
        return torch.bmm(z, self.weight) + self.bias[:, None]

    def directions(self, n_classes: int) -> torch.Tensor:
        """`[P, K, W]` unit steering directions in raw activation space, one per class.

        The gradient of a class's logit with respect to the raw activation is `w / scale`; for
        two classes the single probe points to class 1, so class 0 gets its negative.
        """
        raw = self.weight / self.scale[:, :, None]  # [P, W, O]
        raw = raw.transpose(1, 2)  # [P, O, W]
        if n_classes == 2:
            raw = torch.cat([-raw, raw], dim=1)
        return torch.nn.functional.normalize(raw, dim=-1)


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-probe feature mean and population std, as StandardScaler (constant features: 1)."""
    # Two passes (mean, then squared deviations): exact for large offsets, and plain sums over
    # the sample axis run faster on the CPU than torch.var_mean over a middle axis.
    mean = x.sum(dim=1) / x.shape[1]
    std = ((x - mean[:, None]).square().sum(dim=1) / x.shape[1]).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def targets(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`[n, O]` float targets: class 1 for two classes, one-vs-rest columns for more."""
    if n_classes == 2:
        return (y == 1).float()[:, None]
    return torch.nn.functional.one_hot(y, n_classes).float()


# -- backends --------------------------------------------------------------------------------


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
               max_iter: int = 100, tol: float = 1e-3, chunk_mb: float | None = None) -> ProbeFit:
    """All P probes together: Nesterov-accelerated gradient descent with a step of 1/L per probe,
    stopping once every probe's largest gradient entry is below `tol`.

    Probes are solved in chunks of about `chunk_mb` of data: all at once on a GPU, 8 MB on the
    CPU, where a chunk's iterations then run on cached data."""
    if chunk_mb is None:
        chunk_mb = float("inf") if x.is_cuda else 8.0
    per_probe_mb = x[0].numel() * 4 / 2**20
    size = len(x) if chunk_mb == float("inf") else max(1, int(chunk_mb // per_probe_mb))
    return ProbeFit.concat([_fit_logreg_chunk(x[i : i + size], y, n_classes, C, max_iter, tol)
                            for i in range(0, len(x), size)])


def _fit_logreg_chunk(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float,
                      max_iter: int, tol: float) -> ProbeFit:
    # Standardisation is folded into the products instead of copying x:
    # z @ w = x @ (w / scale) - mean . (w / scale), and z^T r = (x^T r - mean * sum(r)) / scale.
    mean, scale = standardise(x)
    inv = (1 / scale)[..., None]  # [P, W, 1]
    centre = mean[..., None]
    n = x.shape[1]
    t = targets(y, n_classes).to(x.dtype)  # [n, O]

    def z_mv(w: torch.Tensor) -> torch.Tensor:
        u = w * inv
        return _matvec(x, u) - (centre * u).sum(dim=1, keepdim=True)

    def z_rmv(r: torch.Tensor) -> torch.Tensor:
        return (_rmatvec(x, r) - centre * r.sum(dim=1, keepdim=True)) * inv

    # Lipschitz constant of the mean-loss gradient: lambda_max(Z^T Z) / 4n + 1 / Cn (the
    # intercept's column is orthogonal to the centred z and adds n <= lambda_max). A margin
    # covers the underestimate of a few power iterations.
    step = (1 / (1.5 * _top_eigenvalue(z_mv, z_rmv, x) / (4 * n) + 1 / (C * n)))[:, None, None]
    w = torch.zeros(x.shape[0], x.shape[2], t.shape[1], dtype=x.dtype, device=x.device)
    b = torch.zeros(x.shape[0], 1, t.shape[1], dtype=x.dtype, device=x.device)
    w_prev, b_prev, momentum = w, b, 1.0
    for _ in range(max_iter):
        momentum_next = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        beta = (momentum - 1) / momentum_next
        v, c = w + beta * (w - w_prev), b + beta * (b - b_prev)
        residual = torch.sigmoid(z_mv(v) + c) - t  # [P, n, O]
        grad_w = z_rmv(residual) / n + v / (C * n)  # the intercept is not penalised
        grad_b = residual.mean(dim=1, keepdim=True)
        w_prev, b_prev, momentum = w, b, momentum_next
        w, b = v - step * grad_w, c - step * grad_b
        if max(grad_w.abs().amax(), grad_b.abs().amax()) < tol:
            break
    return ProbeFit(mean, scale, w, b[:, 0])


def _top_eigenvalue(z_mv, z_rmv, x: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """Largest eigenvalue of each Z^T Z by power iteration: `[P]`."""
    v = torch.ones(x.shape[0], x.shape[2], 1, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        v = torch.nn.functional.normalize(z_rmv(z_mv(v)), dim=1)
    return z_mv(v).square().sum(dim=(1, 2))


def _matvec(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`z @ v` per probe. On the CPU, torch's batched matrix-vector product takes a slow path
    (several times slower than 2-D products on cached data), so loop there."""
    if z.is_cuda:
        return torch.bmm(z, v)
    return torch.stack([zp @ vp for zp, vp in zip(z, v, strict=True)])


def _rmatvec(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """`z^T @ r` per probe, computed as `(r^T z)^T` to read z row by row."""
    if z.is_cuda:
        return torch.bmm(z.transpose(1, 2), r)
    return torch.stack([(rp.T @ zp).T for zp, rp in zip(z, r, strict=True)])


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
    mean, scale, weight, bias = (torch.tensor(np.stack(a), dtype=x.dtype, device=x.device)
                                 for a in zip(*fits, strict=True))
    return ProbeFit(mean, scale, weight, bias)


def fit_mean_diff(x: torch.Tensor, y: torch.Tensor, n_classes: int, **_: object) -> ProbeFit:
    """Difference of class means (one-vs-rest), thresholded half-way between them."""
    mean, scale = standardise(x)
    z = (x - mean[:, None]) / scale[:, None]
    t = targets(y, n_classes).to(z.dtype)  # [n, O]
    positive = torch.einsum("pnw,no->pwo", z, t / t.sum(0))
    negative = torch.einsum("pnw,no->pwo", z, (1 - t) / (1 - t).sum(0))
    weight = positive - negative
    bias = -(weight * (positive + negative) / 2).sum(dim=1)
    return ProbeFit(mean, scale, weight, bias)


BACKENDS = {"logreg": fit_logreg, "sklearn": fit_sklearn, "mean_diff": fit_mean_diff}


def fit_probes(backend: str, x: torch.Tensor, y: torch.Tensor, n_classes: int,
               **options: object) -> ProbeFit:
    """Fit `x: [P, N, W]` (any float dtype; fitted in float32) to labels `y: [N]`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown probe backend {backend!r}; valid: {sorted(BACKENDS)}")
    return BACKENDS[backend](x.float(), y, n_classes, **options)


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
