"""Figures people would rather look at than read. All are written as PNG and returned by path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from icm_lab.io.files import write_figure, write_image  # noqa: E402
from icm_lab.models.adapters import block_name, short_name, short_name_key  # noqa: E402

KIND_COLOURS = {"attn1": "tab:blue", "attn2": "tab:orange", "bottleneck": "tab:green"}
KIND_NAMES = {"attn1": "attn1 (self-attention)", "attn2": "attn2 (cross-attention)",
              "bottleneck": "bottleneck (mid_block output)"}
CHANCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1}
FONT = 8  # the smallest text in any figure: tick labels, legends


def step_axis(ax: plt.Axes, n_steps: int) -> None:
    """Whole-number steps, and which end is which."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"denoising step (0 = pure noise, {n_steps - 1} = last step)")


def separability_heatmaps(scores: pd.DataFrame, path: Path, chance: float,
                          score: str = "balanced_accuracy", title: str = "") -> Path:
    """Layers x steps heatmaps of held-out probe scores, attn1 and attn2 side by side, one
    colour scale from at or below chance (marked on the colour bar) to 1."""
    kinds = [k for k in ("attn1", "attn2") if (scores["kind"] == k).any()] or list(
        dict.fromkeys(scores["kind"]))
    lo = min(chance, float(scores[score].min()))
    n_layers = max((scores["kind"] == k).groupby(scores["layer"]).any().sum() for k in kinds)
    n_steps = int(scores["step"].max()) + 1
    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 2.2 + 0.3 * n_layers),
                             squeeze=False, constrained_layout=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        table = scores[scores["kind"] == kind].pivot(index="layer", columns="step", values=score)
        table = table.loc[list(dict.fromkeys(scores.loc[scores["kind"] == kind, "layer"]))]
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=1.0,
                          interpolation="nearest")
        ax.set_yticks(range(len(table)), [block_name(n) for n in table.index], fontsize=FONT)
        suffix = f" + .{kind}" if kind in ("attn1", "attn2") else ""
        ax.set_ylabel(f"layer (module path in the denoiser{suffix})")
        ax.tick_params(axis="x", labelsize=FONT)
        step_axis(ax, n_steps)
        ax.set_title(KIND_NAMES.get(kind, kind))
    bar = fig.colorbar(image, ax=axes[0].tolist(), label=f"{_label(score)} (held-out images)")
    bar.ax.axhline(chance, **CHANCE_STYLE)
    bar.ax.text(-0.15, chance, f"chance {chance:.2f}", transform=bar.ax.get_yaxis_transform(),
                ha="right", va="center", fontsize=FONT)
    fig.suptitle(title or "Attribute separability per layer and step")
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def layer_ranking(ranking: pd.DataFrame, path: Path, chance: float, window: range,
                  score: str = "balanced_accuracy", selected: list[str] = (),
                  title: str = "") -> Path:
    """Horizontal bars of each layer's mean score over the steering window, best at the top,
    coloured by kind, the selected layers outlined; the axis starts at or below chance."""
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.27 * len(ranking)), constrained_layout=True)
    order = ranking.iloc[::-1]
    colours = [KIND_COLOURS.get(k, "grey") for k in order["kind"]]
    bars = ax.barh(range(len(order)), order[score], color=colours)
    for bar, layer in zip(bars, order["layer"], strict=True):
        if layer in selected:
            bar.set_edgecolor("black")
            bar.set_linewidth(2)
    ax.set_yticks(range(len(order)), list(order["layer"]), fontsize=FONT)
    ax.tick_params(axis="x", labelsize=FONT)
    ax.set_xlim(min(chance, float(order[score].min())) - 0.02, 1.0)
    ax.axvline(chance, **CHANCE_STYLE)
    ax.set_xlabel(f"mean {_label(score)} over the steering window (steps {window.start}-"
                  f"{window.stop - 1}; 0 = pure noise)")
    kinds = [k for k in KIND_COLOURS if k in set(order["kind"])]
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLOURS.get(k, "grey")) for k in kinds]
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", linewidth=2),
                plt.Line2D([], [], **CHANCE_STYLE)]
    labels = [KIND_NAMES.get(k, k) for k in kinds] + ["selected for steering",
                                                      f"chance ({chance:.2f})"]
    ax.legend(handles, labels, loc="lower right", fontsize=FONT)
    ax.set_title(title or "Layers ranked by separability")
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def explicit_swap_comparison(swap: pd.DataFrame, implicit: pd.DataFrame, path: Path,
                             score: str = "balanced_accuracy") -> Path:
    """Per attn2 layer: how often swapping in an explicit prompt there yields the class
    (explicit conditioning), beside the layer's implicit separability."""
    layers = list(dict.fromkeys(swap["layer"]))
    classes = list(dict.fromkeys(swap["class"]))
    chance = 1 / len(classes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 2.2 + 0.3 * len(layers)), sharey=True,
                                      layout="constrained")
    height = 0.8 / len(classes)
    for i, name in enumerate(classes):
        rows = swap[swap["class"] == name].set_index("layer").loc[layers]
        left.barh(np.arange(len(layers)) + i * height, rows["rate"], height=height,
                  label=f"{name} (dotted: no swap)")
        left.axvline(rows["base_rate"].iloc[0], color=f"C{i}", linestyle=":", linewidth=1)
    left.set_yticks(np.arange(len(layers)) + 0.4 - height / 2, layers, fontsize=FONT)
    left.set_ylabel("attn2 layer (module path in the denoiser)")
    left.set_xlim(0, 1)
    left.set_xlabel(f"share of images showing the class ({swap['n'].iloc[0]} images per bar)")
    left.set_title("Explicit conditioning: swap one attn2 layer's text")
    fig.legend(loc="outside lower left", ncols=len(classes), fontsize=FONT, title="class",
               title_fontsize=FONT)
    mean = implicit.groupby("layer")[score].mean().reindex(layers)
    right.barh(np.arange(len(layers)) + 0.4 - height / 2, mean, color="tab:orange")
    right.axvline(chance, **CHANCE_STYLE, label=f"chance ({chance:.2f})")
    right.set_xlim(min(chance, float(mean.min())) - 0.02, 1.0)
    right.set_xlabel(f"mean {_label(score)} over all steps (held-out images)")
    right.set_title("Implicit choice: probe separability at the same layers")
    right.legend(fontsize=FONT, loc="lower right")
    left.invert_yaxis()
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _label(score: str) -> str:
    return score.replace("_", " ")


GRID_TILE = 128  # pixels per image in a before/after grid: small images scaled up sharp (nearest),
# large ones down smoothly (Lanczos)
FRAME = (40, 40, 40)  # no hue: the images' own colours may be what is steered


def before_after_grid(before_images: list[Path], after_images: list[Path], before: list[str],
                      after: list[str], targets: list[str], title: str, path: Path) -> Path:
    """Two rows, same seeds: unsteered above, steered below, each labelled with its class; a
    steered image also with its target, framed where it shows the target ("missed" where
    not). Drawn with PIL alone: about 20 ms a grid (BENCHMARKS.md), no plotting library."""
    tile, pad, caption, margin, head = GRID_TILE, 6, 30, 70, 46
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    key = ("Each column is one seed: the base image above, the steered one below. Frame: the "
           "steered image shows its target; \"missed\": it does not.")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(measure.textlength(title, font=title_font), measure.textlength(key, font))
    width = max(margin + len(before_images) * (tile + pad), int(text_width) + 2 * pad)
    grid = Image.new("RGB", (width, head + 2 * (tile + caption + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 6), title, fill="black", font=title_font)
    draw.text((pad, 26), key, fill="black", font=font)
    rows = ((before_images, before, [""] * len(before)), (after_images, after, targets))
    for row, (paths, labels, aims) in enumerate(rows):
        top = head + row * (tile + caption + pad)
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
    write_image(grid, path)
    return path


def class_distribution(table: pd.DataFrame, classes: list[str], target: np.ndarray, path: Path,
                       fd: dict[str, dict], title: str = "") -> Path:
    """Share of each class among the decided images of each prompt, base against steered, the
    target marked, with 95% bootstrap intervals; each panel with its image count and FD, the
    title with the mean FD and its interval (`fd`: the base and steered sections of
    metrics.json)."""
    prompts = list(dict.fromkeys(table["prompt"]))
    columns = min(4, len(prompts))
    rows_of_panels = -(-len(prompts) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, squeeze=False, sharey=True,
                             figsize=(3.2 * columns + 0.6, 3.0 * rows_of_panels + 1.0),
                             layout="constrained")
    for ax in axes.flat[len(prompts):]:
        ax.set_visible(False)
    x = np.arange(len(classes))
    for ax, prompt in zip(axes.flat, prompts, strict=False):
        rows = table[table["prompt"] == prompt]
        for offset, column, colour, side in ((-0.2, "base_label", "tab:grey", "base"),
                                             (0.2, "label", "tab:purple", "steered")):
            decided = rows[column][rows[column].isin(classes)]  # as FD counts them
            share = np.array([(decided == k).mean() if len(decided) else np.nan
                              for k in classes])
            ax.bar(x + offset, share, width=0.4, color=colour,
                   yerr=_share_errors(fd[side], prompt, share), capsize=2, ecolor="black",
                   error_kw={"linewidth": 0.8})
        ax.scatter(x, target, marker="_", s=400, color="black", zorder=3)
        ax.set_xticks(x, classes, rotation=30 if max(map(len, classes)) > 6 else 0,
                      fontsize=FONT)
        ax.tick_params(axis="y", labelsize=FONT)
        ax.set_ylim(0, 1)
        per = {side: fd[side]["per_prompt"][prompt] for side in ("base", "steered")}
        ax.set_title(f"\"{prompt}\"\n{per['base']['n_images']} images each; FD "
                     f"{per['base']['fd']:.2f} → {per['steered']['fd']:.2f}"
                     f"{_undecided(per)}", fontsize=FONT + 1)
    for row in axes:
        row[0].set_ylabel("share of decided images")
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:grey"),
               plt.Rectangle((0, 0), 1, 1, color="tab:purple"),
               plt.Line2D([], [], color="black", linewidth=2)]
    fig.legend(handles, ["base (unsteered)", "steered (same seeds)", "target share"],
               loc="outside lower center", ncols=3, fontsize=FONT + 1)
    n_base, n_steered = fd["base"]["n_images"], fd["steered"]["n_images"]
    fig.suptitle(f"{title or 'Class distribution per prompt'}\nFD (mean over prompts, lower is "
                 f"better): base {_with_ci(fd['base'])} → steered {_with_ci(fd['steered'])}\n"
                 f"{n_base} + {n_steered} images; [ ] and bars: 95% bootstrap intervals",
                 fontsize=FONT + 2)
    write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _with_ci(metrics: dict, key: str = "fd") -> str:
    interval = metrics.get("ci", {}).get(key)
    return f"{metrics[key]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval
                                    else "")


def _share_errors(metrics: dict, prompt: str, share: np.ndarray) -> np.ndarray | None:
    """Error bars from the bootstrap interval of each class share (metrics.json `ci`)."""
    interval = metrics.get("ci", {}).get("per_prompt", {}).get(prompt)
    if interval is None:
        return None
    low, high = np.array(interval, dtype=float).T
    return np.clip(np.nan_to_num(np.stack([share - low, high - share])), 0, None)


def _undecided(per_prompt: dict[str, dict]) -> str:
    """", undecided 3 / 1" when any image of the prompt has no label."""
    counts = [per_prompt[side]["n_undecided"] for side in ("base", "steered")]
    return f"; undecided {counts[0]} / {counts[1]}" if any(counts) else ""


def causal_heatmaps(table: pd.DataFrame, order: list[str], column: str, path: Path,
                    title: str = "") -> Path:
    """The causal map: per kind (attn1, attn2, bottleneck side by side), layers in `order` (the
    separability heatmap's) by `column` (class, or window), of the shift of the target-class
    rate when that layer alone is steered. One diverging colour scale centred on 0; each cell
    prints its shift, starred where its 95% interval excludes 0."""
    kinds = [k for k in KIND_COLOURS if (table["kind"] == k).any()]
    columns = list(dict.fromkeys(table[column]))
    limit = max(0.05, float(table["effect"].abs().max()))
    n_rows = {k: (table["kind"] == k).groupby(table["layer"]).any().sum() for k in kinds}
    fig = plt.figure(figsize=(4.5 + (0.6 + 0.5 * len(columns)) * len(kinds),
                              2.0 + 0.32 * max(n_rows.values())), layout="constrained")
    grid = fig.add_gridspec(max(n_rows.values()), len(kinds))
    image, previous = None, None
    for i, kind in enumerate(kinds):
        rows = table[table["kind"] == kind]
        layers = [name for name in order if name in set(rows["layer"])]
        ax = fig.add_subplot(grid[:n_rows[kind], i])
        cells = {key: rows.pivot(index="layer", columns=column, values=key).loc[layers, columns]
                 .to_numpy() for key in ("effect", "ci_low", "ci_high")}
        image = ax.imshow(cells["effect"], aspect="auto", cmap="RdBu_r", vmin=-limit,
                          vmax=limit, interpolation="nearest")
        for (r, c), value in np.ndenumerate(cells["effect"]):
            clear = not cells["ci_low"][r, c] <= 0 <= cells["ci_high"][r, c]
            ax.text(c, r, f"{value:+.2f}{'*' if clear else ''}", ha="center", va="center",
                    fontsize=FONT - 1, color="white" if abs(value) > limit / 2 else "black")
        ax.set_xticks(range(len(columns)), columns, fontsize=FONT)
        ax.xaxis.tick_top()
        names = [block_name(n) for n in layers]
        ax.set_yticks(range(len(layers)), names if names != previous else [], fontsize=FONT)
        previous = names
        ax.set_title(KIND_NAMES.get(kind, kind), fontsize=FONT + 2)
    fig.colorbar(image, ax=fig.axes, shrink=0.9, label="shift of the target-class rate")
    what = ("columns: the class steered toward (mean: over classes)" if column == "class" else
            f"columns: the {column} steered; value: mean over classes")
    fig.suptitle(f"{title or 'Causal effect per layer'}\n{what}; shift: steered − unsteered "
                 "share of images showing the target, same seeds; *: 95% interval excludes 0",
                 fontsize=FONT + 1)
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def separability_vs_effect(points: pd.DataFrame, path: Path, chance: float,
                           score: str = "balanced_accuracy", title: str = "") -> Path:
    """One point per layer: its separability (mean `score` over the steering window) against
    its causal effect (mean shift of the target-class rate over classes, with its 95%
    interval), coloured by kind and named by its short name."""
    fig, ax = plt.subplots(figsize=(8.5, 6), layout="constrained")
    for kind in [k for k in KIND_COLOURS if (points["kind"] == k).any()]:
        rows = points[points["kind"] == kind]
        error = np.abs(rows[["ci_low", "ci_high"]].to_numpy().T - rows["effect"].to_numpy())
        ax.errorbar(rows[score], rows["effect"], yerr=error, fmt="o", capsize=2,
                    color=KIND_COLOURS[kind], label=f"{KIND_NAMES[kind]}{_rho(rows, score)}")
        # Named: the layers with a clear effect and the most separable ones; layers at about
        # the same point share one label, their names stacked.
        clear = (rows["ci_low"] > 0) | (rows["ci_high"] < 0)
        named = rows[clear | rows[score].rank(ascending=False, method="first").le(3)]
        spot = named.assign(x=named[score].round(2), y=named["effect"].round(2))
        for (x, y), near in spot.groupby(["x", "y"]):
            ax.annotate("\n".join(short_name(n) for n in near["layer"]), (x, y), xytext=(4, 3),
                        textcoords="offset points", fontsize=FONT - 1, va="bottom",
                        color=KIND_COLOURS[kind])
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(chance, **CHANCE_STYLE, label=f"chance separability ({chance:.2f})")
    ax.set_xlabel(f"separability: mean {_label(score)} over the steering window")
    ax.set_ylabel("causal effect: mean shift of the target-class rate\n(steered − unsteered, "
                  "mean over classes; bars: 95% interval)")
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="upper left")
    ax.set_title(f"{title or 'Separability against causal effect'}\nnamed: layers whose "
                 f"interval excludes 0 and the 3 most separable of each kind. "
                 f"{short_name_key()}", fontsize=FONT + 1, wrap=True)
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _rho(rows: pd.DataFrame, score: str) -> str:
    """Spearman's rank correlation of separability and effect, when there are 3+ layers."""
    if len(rows) < 3:
        return ""
    return f", Spearman ρ {rows[score].corr(rows['effect'], method='spearman'):+.2f}"
