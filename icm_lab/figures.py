"""Figures people would rather look at than read. All are written as PNG and returned by path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from icm_lab.models.adapters import short_name  # noqa: E402

KIND_COLOURS = {"attn1": "tab:blue", "attn2": "tab:orange", "bottleneck": "tab:green"}


def separability_heatmaps(scores: pd.DataFrame, path: Path, score: str = "balanced_accuracy",
                          title: str = "") -> Path:
    """Layers x steps heatmaps of probe scores, attn1 and attn2 side by side, one colour scale."""
    kinds = [k for k in ("attn1", "attn2") if (scores["kind"] == k).any()]
    lo, hi = min(0.5, scores[score].min()), max(scores[score].max(), 0.5 + 1e-3)
    n_layers = max((scores["kind"] == k).groupby(scores["layer"]).any().sum() for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 1.5 + 0.28 * n_layers),
                             squeeze=False, constrained_layout=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        table = scores[scores["kind"] == kind].pivot(index="layer", columns="step", values=score)
        table = table.loc[list(dict.fromkeys(scores.loc[scores["kind"] == kind, "layer"]))]
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_yticks(range(len(table)), [short_name(n) for n in table.index], fontsize=7)
        ax.set_xlabel("denoising step")
        ax.set_title(f"{kind} ({'self' if kind == 'attn1' else 'cross'}-attention)")
    fig.colorbar(image, ax=axes[0].tolist(), label=score.replace("_", " "))
    fig.suptitle(title or "Attribute separability per layer and step")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_ranking(ranking: pd.DataFrame, path: Path, score: str = "balanced_accuracy",
                  selected: list[str] = (), title: str = "") -> Path:
    """Horizontal bars of each layer's window-mean score, best at the top, coloured by kind."""
    fig, ax = plt.subplots(figsize=(7, 1 + 0.25 * len(ranking)), constrained_layout=True)
    order = ranking.iloc[::-1]
    colours = [KIND_COLOURS.get(k, "grey") for k in order["kind"]]
    bars = ax.barh(range(len(order)), order[score], color=colours)
    for bar, layer in zip(bars, order["layer"], strict=True):
        if layer in selected:
            bar.set_edgecolor("black")
            bar.set_linewidth(2)
    labels = [f"{short_name(n)} {k}" for n, k in zip(order["layer"], order["kind"], strict=True)]
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    ax.set_xlim(min(0.5, order[score].min()) - 0.02, 1.0)
    ax.set_xlabel(f"mean {score.replace('_', ' ')} over the steering window")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, KIND_COLOURS, loc="lower right", fontsize=8)
    ax.set_title(title or "Layers ranked by separability (outlined: selected)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def explicit_swap_comparison(swap: pd.DataFrame, implicit: pd.DataFrame, path: Path,
                             score: str = "balanced_accuracy") -> Path:
    """Per attn2 layer: how often swapping in an explicit prompt there yields the class
    (explicit conditioning), beside the layer's implicit separability."""
    layers = list(dict.fromkeys(swap["layer"]))
    classes = list(dict.fromkeys(swap["class"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.3 * len(layers)), sharey=True,
                                      constrained_layout=True)
    height = 0.8 / len(classes)
    for i, name in enumerate(classes):
        rows = swap[swap["class"] == name].set_index("layer").loc[layers]
        left.barh(np.arange(len(layers)) + i * height, rows["rate"], height=height, label=name)
        left.axvline(rows["base_rate"].iloc[0], color=f"C{i}", linestyle=":", linewidth=1)
    left.set_yticks(np.arange(len(layers)) + 0.4 - height / 2, [short_name(n) for n in layers],
                    fontsize=7)
    left.set_xlabel("share of images showing the class (dotted: no swap)")
    left.set_title("Explicit conditioning: swap one attn2 layer's text")
    left.legend(fontsize=8)
    mean = implicit.groupby("layer")[score].mean().reindex(layers)
    right.barh(np.arange(len(layers)) + 0.4 - height / 2, mean, color="tab:orange")
    right.set_xlabel(f"mean {score.replace('_', ' ')} over all steps")
    right.set_title("Implicit choice: probe separability at the same layers")
    left.invert_yaxis()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


GRID_TILE = 128  # pixels per image in a before/after grid: small images scaled up sharp (nearest),
# large ones down smoothly (Lanczos)
FRAME = (40, 40, 40)  # no hue: the images' own colours may be what is steered


def before_after_grid(before_images: list[Path], after_images: list[Path], before: list[str],
                      after: list[str], targets: list[str], title: str, path: Path) -> Path:
    """Two rows, same seeds: unsteered above, steered below, each labelled with its class; a
    steered image also with its target, framed where it shows the target ("missed" where
    not). Drawn with PIL alone: about 20 ms a grid (BENCHMARKS.md), no plotting library."""
    tile, pad, caption, margin = GRID_TILE, 6, 30, 70
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    key = "framed: the steered image shows its target"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading = measure.textlength(title, font=title_font) + 3 * pad + measure.textlength(key, font)
    width = max(margin + len(before_images) * (tile + pad), int(heading))
    grid = Image.new("RGB", (width, 28 + 2 * (tile + caption + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 6), title, fill="black", font=title_font)
    draw.text((width - pad - draw.textlength(key, font=font), 8), key, fill="black", font=font)
    rows = ((before_images, before, [""] * len(before)), (after_images, after, targets))
    for row, (paths, labels, aims) in enumerate(rows):
        top = 28 + row * (tile + caption + pad)
        draw.text((pad, top + tile // 2 - 7), ("base", "steered")[row], fill="black", font=font)
        for i, (image_path, label, aim) in enumerate(zip(paths, labels, aims, strict=True)):
            left = margin + i * (tile + pad)
            image = Image.open(image_path).convert("RGB")
            smooth = image.width > tile
            resample = Image.Resampling.LANCZOS if smooth else Image.Resampling.NEAREST
            grid.paste(image.resize((tile, tile), resample), (left, top))
            if aim:
                if label == aim:
                    draw.rectangle((left - 3, top - 3, left + tile + 2, top + tile + 2),
                                   outline=FRAME, width=3)
                label = f"{label}\n(target {aim}{'' if label == aim else ', missed'})"
            draw.multiline_text((left, top + tile + 3), label, fill="black", font=font,
                                spacing=1)
    grid.save(path)
    return path


def class_distribution(table: pd.DataFrame, classes: list[str], target: np.ndarray, path: Path,
                       title: str = "") -> Path:
    """Share of each class per prompt, base against steered, with the target marked."""
    prompts = list(dict.fromkeys(table["prompt"]))
    columns = min(6, len(prompts))
    rows_of_panels = -(-len(prompts) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, squeeze=False, sharey=True,
                             figsize=(2.3 * columns + 0.5, 2.8 * rows_of_panels),
                             constrained_layout=True)
    for ax in axes.flat[len(prompts):]:
        ax.set_visible(False)
    x = np.arange(len(classes))
    for ax, prompt in zip(axes.flat, prompts, strict=False):
        rows = table[table["prompt"] == prompt]
        for offset, column, name in ((-0.2, "base_label", "base"), (0.2, "label", "steered")):
            share = [(rows[column] == k).mean() for k in classes]
            ax.bar(x + offset, share, width=0.4, label=name)
        ax.scatter(x, target, marker="_", s=400, color="black", label="target", zorder=3)
        ax.set_xticks(x, classes, rotation=45, fontsize=7)
        ax.set_title(prompt, fontsize=7)
    for row in axes:
        row[0].set_ylabel("share of images")
    axes.flat[len(prompts) - 1].legend(fontsize=7)
    fig.suptitle(title or "Class distribution per prompt")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
