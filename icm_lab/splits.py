"""Train/test splits for probing. By default grouped by prompt, so that no prompt sits on both
sides; per-image stratified splitting (the paper's setting) is an option. Both are seeded."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

SPLITS = ("prompt", "image")


def split_indices(labels: np.ndarray, groups: np.ndarray, method: str, test_size: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train, test)` positions into `labels`."""
    if method not in SPLITS:
        raise ValueError(f"unknown split {method!r}; valid: {list(SPLITS)}")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)}
    if len(counts) < 2 or min(counts.values()) < 2:
        raise ValueError(f"probing needs at least 2 images of each of at least 2 classes; "
                         f"label counts are {counts}")
    positions = np.arange(len(labels))
    if method == "image":
        return train_test_split(positions, test_size=test_size, stratify=labels,
                                random_state=seed)
    n_splits = max(2, round(1 / test_size))
    if len(np.unique(groups)) < n_splits:
        raise ValueError(f"a prompt-grouped split with test_size={test_size} needs at least "
                         f"{n_splits} prompts, got {len(np.unique(groups))}; collect more "
                         "images or use localize.split=image")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(folds.split(positions, labels, groups))
    return train, test
