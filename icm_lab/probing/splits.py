"""Train/test splits for probing. By default grouped by prompt, so that no prompt sits on both
sides; per-image stratified splitting (the paper's setting) is an option. One split or k folds;
all are seeded."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from icm_lab.config.schema import Split

SPLITS = tuple(split.value for split in Split)  # localize.split's choices


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


def fold_indices(labels: np.ndarray, groups: np.ndarray, method: str, folds: int,
                 test_size: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` pairs of `(train, test)` positions, shuffled and seeded, each position tested
    once: stratified k-fold per image, or stratified group k-fold by prompt (no prompt on both
    sides of a fold). `folds=1`: the single `test_size` split of `split_indices`."""
    if folds == 1:
        return [split_indices(labels, groups, method, test_size, seed)]
    if method not in SPLITS:
        raise ValueError(f"unknown split {method!r}; valid: {list(SPLITS)}")
    positions = np.arange(len(labels))
    if method == "image":
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(positions, labels))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(positions, labels, groups))
