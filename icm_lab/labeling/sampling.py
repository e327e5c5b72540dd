"""Which prompt and seed each sample uses, and how generated images are written and labelled:
the helpers every stage shares.

Sample i of a plan uses a seed derived from (seed, i) alone, so a sample does not depend on the
plan's size or on which batch, shard or job makes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from icm_lab.core.errors import ConfigError
from icm_lab.io.files import write_image
from icm_lab.labeling.labelers import Labels

EVAL_SEED_OFFSET = 1_000_003  # evaluation's seed stream, apart from collection's


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def _positive_int(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
    return value


def sample_plan(prompts: tuple[str, ...], n_images: int, seed: int) -> pd.DataFrame:
    """N samples spread round-robin over the prompts (prompt i mod P, so prompts are balanced)."""
    index = np.arange(_positive_int("collect.n_images", n_images))
    prompt_id = index % len(prompts)
    return pd.DataFrame({
        "index": index,
        "prompt_id": prompt_id,
        "prompt": [prompts[i] for i in prompt_id],
        "seed": [sample_seed(seed, i) for i in index],
    })


def eval_plan(prompts: tuple[str, ...], per_prompt: int, seed: int) -> pd.DataFrame:
    """Every evaluation prompt `per_prompt` times, each sample with its own seed, from a stream
    apart from collection's, so evaluation never reuses a probe's image."""
    prompt_id = np.repeat(np.arange(len(prompts)),
                          _positive_int("eval.n_images_per_prompt", per_prompt))
    index = np.arange(len(prompt_id))
    return pd.DataFrame({
        "index": index, "prompt_id": prompt_id, "prompt": [prompts[i] for i in prompt_id],
        "seed": [sample_seed(seed + EVAL_SEED_OFFSET, i) for i in index],
    })


def save_images(images: list, indices: pd.Series, directory: Path, root: Path) -> list[str]:
    """Write `<index>.png` per image into `directory`; return the paths relative to `root`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, index in zip(images, indices, strict=True):
        path = directory / f"{index:06d}.png"
        write_image(image, path)
        paths.append(str(path.relative_to(root)))
    return paths


def labelled_table(rows: pd.DataFrame, labels: Labels, paths: list[str]) -> pd.DataFrame:
    """`rows` with each image's label, path, class probabilities (`p_<class>`) and `weight`, the
    readings behind them (FairFace: faces found; else 1, or 0 without a reading)."""
    table = rows.reset_index(drop=True).assign(label=labels.labels, image=paths)
    for k, name in enumerate(labels.classes):
        table[f"p_{name}"] = labels.probs[:, k]
    has_reading = ~np.isnan(labels.probs).all(axis=1)
    table["weight"] = has_reading.astype(float) if labels.weights is None else labels.weights
    return table
