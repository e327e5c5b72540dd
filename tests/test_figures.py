"""Figures a reader can use without the code: names, axes, steps, chance, legends and counts.
Each figure is drawn from small synthetic tables and inspected before it is closed."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import Normalize

from icm_lab.report import figures

LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
          "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
          "up_blocks.1.attentions.0.transformer_blocks.0.attn2"]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the next drawing closes, kept open for inspection."""
    kept = []
    monkeypatch.setattr(figures.plt, "close", kept.append)
    return kept


def scores(n_steps: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"layer": layer, "kind": layer[-5:], "step": step,
                          "balanced_accuracy": rng.uniform(0.4, 0.95)}
                         for layer in LAYERS for step in range(n_steps)])


def texts(fig) -> str:
    """Every piece of text in the figure: titles, labels, tick labels, legends."""
    return "\n".join(t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text")))


def test_separability_heatmaps_read_without_the_code(tmp_path, drawn):
    figures.separability_heatmaps(scores(), tmp_path / "s.png", chance=0.25)
    fig, = drawn
    heat = fig.axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == [
        "down_blocks.0.attentions.0.transformer_blocks.0",  # full names, no key needed
        "up_blocks.1.attentions.0.transformer_blocks.0"]
    assert heat.get_ylabel().startswith("layer")
    assert "0 = pure noise" in heat.get_xlabel()
    assert all(float(tick).is_integer() for tick in heat.get_xticks())  # whole steps
    norm: Normalize = heat.images[0].norm
    assert norm.vmin <= 0.25 and norm.vmax == 1.0  # the scale reaches down to chance
    assert "chance 0.25" in texts(fig)


def test_layer_ranking_starts_at_chance_and_explains_its_marks(tmp_path, drawn):
    ranking = scores().groupby(["layer", "kind"], as_index=False)["balanced_accuracy"].mean()
    ranking = ranking.sort_values("balanced_accuracy", ascending=False)
    figures.layer_ranking(ranking, tmp_path / "r.png", chance=0.5, window=range(3, 12),
                          selected=LAYERS[:1])
    ax = drawn[0].axes[0]
    assert ax.get_xlim()[0] <= 0.5
    assert "steps 3-11" in ax.get_xlabel() and "0 = pure noise" in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["attn1 (self-attention)", "attn2 (cross-attention)",
                      "selected for steering", "chance (0.50)"]
    assert set(LAYERS) <= {t.get_text() for t in ax.get_yticklabels()}


def test_distribution_chart_shows_counts_and_fd(tmp_path, drawn):
    table = pd.DataFrame({"prompt": ["a circle"] * 4, "base_label": ["red"] * 3 + ["undecided"],
                          "label": ["red", "blue", "blue", "red"]})
    per_prompt = {"base": {"fd": 0.707, "n_images": 4, "n_undecided": 1},
                  "steered": {"fd": 0.0, "n_images": 4, "n_undecided": 0}}
    fd = {side: {"fd": per_prompt[side]["fd"], "n_images": 4,
                 "per_prompt": {"a circle": per_prompt[side]}} for side in per_prompt}
    fd["base"]["ci"] = {"fd": [0.5, 0.707], "per_prompt": {"a circle": [[0.5, 1.0], [0.0, 0.5]]}}
    figures.class_distribution(table, ["red", "blue"], np.array([0.5, 0.5]), tmp_path / "d.png",
                               fd=fd)
    fig, = drawn
    ax = fig.axes[0]
    assert ax.get_title() == '"a circle"\n4 images each; FD 0.71 → 0.00; undecided 1 / 0'
    assert [bar.get_height() for bar in ax.patches[:2]] == [1.0, 0.0]  # of decided images
    assert "base 0.707 [0.500, 0.707] → steered 0.000\n4 + 4 images" in fig.get_suptitle()
    whiskers = [tuple(float(y) for y in segment[:, 1]) for bars in ax.collections
                if hasattr(bars, "get_segments")
                for segment in bars.get_segments()]  # the base bars', from its ci
    assert sorted(whiskers)[-2:] == [(0.0, 0.5), (0.5, 1.0)]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["base (unsteered)", "steered (same seeds)", "target share"]


def test_grid_titles_say_which_images_they_show():
    from icm_lab.stages.steer import shown_of

    assert shown_of(8, 32) == "the first 8 of 32 images, in seed order"
    assert shown_of(4, 4) == "all 4 images"
