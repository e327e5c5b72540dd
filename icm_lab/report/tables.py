"""Paper-style tables from every run on disk (`make tables`).

    python -m icm_lab.report.tables [--root outputs] [--out outputs/tables]

Reads every run directory under `--root` (single runs and multirun jobs alike: any folder with
a `metrics.json` or a `localize` link) and writes, as Markdown, LaTeX (booktabs) and CSV, with
the same column names in all three (`COLUMNS`):
- `localization`: per probe set (model, concept, probe backend, fingerprint) and layer kind,
  the best separability (balanced accuracy, ± its std over localize.folds), the mean, and the
  top layers by mean over steps;
- `debiasing`: a row per group of runs with the same settings: model, concept, method, alpha
  and every other setting that differs between the runs read (named as columns, e.g.
  `labeler`, `probe.name`, `layers`, `steps`); FD, FD pooled, FD_soft, KL, deviation, the
  undecided share, FID, KID (lower is better), CLIP-T, CLIP-I (higher is better) as mean ± std
  over seeds; identical reruns (same settings and seed) count once. The caption names the
  labeler and the settings all runs share;
- `comparison`: the paper's layout: method rows, FD, FID, CLIP-T, CLIP-I per concept;
- `alpha_sweep`: ICM's FD and CLIP-I for each steering strength;
and `fd_vs_clip_i.png`, FD against CLIP-I across alpha. Metrics: docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from icm_lab.io.files import write_figure, write_table, write_text  # noqa: E402
from icm_lab.models.adapters import short_name, short_name_key  # noqa: E402

# The one name of each column, in every table and format (↓: lower is better, ↑: higher).
COLUMNS = {
    "model": "model", "concept": "concept", "method": "method", "alpha": "alpha",
    "layers": "layers", "steered_layers": "steered layers (per seed)", "seeds": "seeds",
    "probe": "probe", "probe_set": "probe set",
    "kind": "kind", "best": "best bal. acc. ↑", "mean": "mean bal. acc. ↑",
    "top_layers": "top layers (mean bal. acc.)", "base_fd": "base FD",
    "fd": "FD ↓", "fd_pooled": "FD pooled ↓", "fd_soft": "FD_soft ↓", "kl": "KL ↓",
    "deviation": "deviation ↓", "undecided": "undecided", "fid": "FID ↓", "kid": "KID ↓",
    "clip_t": "CLIP-T ↑", "clip_i": "CLIP-I ↑",
}
DEBIAS_METRICS = ["fd", "fd_pooled", "fd_soft", "kl", "deviation", "undecided", "fid", "kid",
                  "clip_t", "clip_i"]
PAPER_METRICS = ["fd", "fid", "clip_t", "clip_i"]  # the paper's comparison table, per attribute
LAYER_KEY = short_name_key()
# Settings read from each run's config.yaml beyond what metrics.json records: the ones that
# change the numbers (the probe, the collection, the split, the selection, the policy).
CONFIG_SETTINGS = ("probe.name", "probe.C", "probe.tol", "collect.n_images", "localize.split",
                   "localize.test_size", "localize.folds", "steer.policy",
                   "eval.n_images_per_prompt")
LEADING = ["model", "concept", "method", "alpha"]  # always shown, in this order
REPLICATE = "seed"  # runs that differ only in the seed are repeats: mean ± std over them


def run_metrics(root: Path) -> pd.DataFrame:
    """One row per run with a metrics.json: every setting its numbers depend on (metrics.json's
    and CONFIG_SETTINGS from its config.yaml), as text, and the steered metrics. Of identical
    reruns (same settings and seed) only the newest is kept: they are one measurement."""
    rows = [_run_row(path) for path in sorted(root.rglob("metrics.json"))]
    if not rows:
        return pd.DataFrame()
    runs = pd.DataFrame(rows).sort_values("mtime")
    return runs.drop_duplicates([*setting_columns(runs), REPLICATE],
                                keep="last").reset_index(drop=True)


def setting_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c not in {*DEBIAS_METRICS, *OUTCOMES, "run", "mtime"}
            and not c.endswith(INTERVAL)]


INTERVAL = ("_low", "_high")  # a metric's bootstrap interval over images, in one run


# Per run, not settings: the metrics' base FD, the seed and what followed from it.
OUTCOMES = ("base_fd", REPLICATE, "steered_layers")


def _run_row(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    steered = metrics["steered"]
    row = {"run": str(path.parent), "mtime": path.stat().st_mtime,
           "model": metrics["model"], "concept": metrics["concept"], "method": metrics["method"],
           "alpha": float("nan") if metrics.get("alpha") is None else float(metrics["alpha"]),
           REPLICATE: metrics.get("seed", 0), **_recorded_settings(metrics),
           **_layers(metrics, path.parent / "config.yaml"),
           **_config_settings(path.parent / "config.yaml"),
           "base_fd": metrics["base"]["fd"],
           **{key: float(steered.get(key, float("nan"))) for key in DEBIAS_METRICS}}
    if "n_images" in steered:
        row["undecided"] = steered["n_undecided"] / steered["n_images"]
    intervals = steered.get("ci", {})  # bootstrap 95% over images
    for key in DEBIAS_METRICS:
        if key in intervals:
            row[f"{key}_low"], row[f"{key}_high"] = intervals[key]
    return row


def _recorded_settings(metrics: dict) -> dict[str, str]:
    """metrics.json's other settings as short text: "-" where a method adds no vector."""
    window = metrics.get("step_window")
    labeler = metrics.get("labeler") or {}
    options = {k: v for k, v in labeler.items() if k not in ("name", "texts")}
    return {
        "steps": f"{window['first']}-{window['last']}" if window else "-",
        "direction": metrics.get("direction") or "-",
        # metrics.json before steer.units: alpha was raw
        "units": metrics.get("units") or ("raw" if metrics.get("alpha") is not None else "-"),
        "halves": metrics.get("halves") or "-",
        "renorm": str(metrics.get("renorm", "-")),
        "sampler": " ".join(f"{v}" for v in (metrics.get("sampler") or {}).values()) or "-",
        "labeler": labeler.get("name", "-") + (f" ({_options(options)})" if options else ""),
        "features": (metrics.get("features") or {}).get("name", "-"),
    }


def _layers(metrics: dict, config: Path) -> dict[str, str]:
    """`layers`, the setting: the names given, or how `layers=auto` chose; `steered_layers`,
    the outcome: the names, which with auto follow the seed (its probe split)."""
    steered = ", ".join(short_name(n) for n in metrics.get("layers", [])) or "-"
    cfg = OmegaConf.load(config) if config.exists() else None
    if cfg is None or steered == "-" or OmegaConf.select(cfg, "layers.select") != "auto":
        return {"layers": steered, "steered_layers": steered}
    how = OmegaConf.select(cfg, "layers.rank_by", default="separability")
    return {"layers": f"auto: top {cfg.layers.k} {cfg.layers.kind} by {how}",
            "steered_layers": steered}


def _options(options: dict) -> str:
    return ", ".join(f"{k} {Path(v).name if isinstance(v, str) and '/' in v else v}"
                     for k, v in options.items())


def _config_settings(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    cfg = OmegaConf.load(path)
    return {key: str(OmegaConf.select(cfg, key, default="-")) for key in CONFIG_SETTINGS}


def varying_settings(runs: pd.DataFrame) -> list[str]:
    """The setting columns with more than one value between the runs they apply to ("-": a
    steering setting of a method that adds no vector): every one is a grouping key."""
    return [c for c in setting_columns(runs) if c not in LEADING and len(_values(runs[c])) > 1]


def constant_settings(runs: pd.DataFrame) -> dict[str, str]:
    """The settings every run they apply to shares: said once, in the caption."""
    return {c: _values(runs[c])[0] for c in setting_columns(runs)
            if c not in LEADING and len(_values(runs[c])) == 1}


def _values(column: pd.Series) -> list[str]:
    return sorted(set(column.astype(str)) - {"-", "nan"})


def localization_table(root: Path) -> pd.DataFrame:
    """Per probe set and layer kind: best and mean balanced accuracy and the top layers, each
    probe set counted once however many runs link to it. Probe sets of one model and concept
    (other labelers, splits, backends) are told apart by backend and fingerprint."""
    seen, rows = set(), []
    for link in sorted(root.rglob("localize")):
        scores_path = link.resolve() / "scores.parquet"
        meta_path = link.resolve() / "meta.json"
        if not scores_path.exists() or scores_path in seen:
            continue
        seen.add(scores_path)
        meta = json.loads(meta_path.read_text())
        provenance = meta["provenance"]
        scores = pd.read_parquet(scores_path)
        for kind, rows_of_kind in scores.groupby("kind"):
            per_layer = rows_of_kind.groupby("layer")["balanced_accuracy"].mean()
            top = per_layer.sort_values(ascending=False).head(3)
            best = rows_of_kind.loc[rows_of_kind["balanced_accuracy"].idxmax()]
            rows.append({
                "model": provenance["model"], "concept": provenance["concept"],
                "probe": meta["backend"], "probe_set": provenance["fingerprint"], "kind": kind,
                "best": best["balanced_accuracy"],
                "best_std": best.get("balanced_accuracy_std", float("nan")),  # over folds
                "mean": rows_of_kind["balanced_accuracy"].mean(),
                "top_layers": ", ".join(f"{short_name(n)} ({v:.2f})" for n, v in top.items()),
            })
    return pd.DataFrame(rows)


def debiasing_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting group (LEADING and every varying setting): the mean of each metric over
    seeds (`<metric>`), its standard deviation (`<metric>_std`, NaN for one seed), the mean of
    its bootstrap interval's bounds (`<metric>_low`, `_high`), and `seeds`."""
    keys = [*LEADING, *varying_settings(runs)]
    grouped = runs.groupby(keys, sort=True, dropna=False)
    bounds = [c for c in runs.columns if c.endswith(INTERVAL)]
    table = grouped[["base_fd", *DEBIAS_METRICS, *bounds]].mean()
    spread = grouped[DEBIAS_METRICS].std(ddof=1).add_suffix("_std")
    table = table.join(spread)
    table["seeds"] = grouped[REPLICATE].nunique()
    if runs["layers"].str.startswith("auto").any():  # which layers auto chose, per seed
        table["steered_layers"] = grouped["steered_layers"].agg(
            lambda names: " / ".join(sorted(set(names))))
    return table.reset_index()


def group_keys(debias: pd.DataFrame) -> list[str]:
    """The debiasing table's grouping columns: everything but numbers and outcomes."""
    return [c for c in debias.columns if c not in {*DEBIAS_METRICS, *OUTCOMES, "seeds"}
            and not c.endswith(("_std", *INTERVAL))]


def comparison_table(debias: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: a row per method (and per other varying setting), FD, FID, CLIP-T
    and CLIP-I per concept side by side. Layers and probe sets follow the concept (each has
    its own localization), so they key rows only when one concept has several."""
    settings = [c for c in group_keys(debias) if c != "concept"]
    rows = [c for c in settings if c != "layers"]
    if debias.duplicated([*rows, "concept"]).any():
        rows = settings
    values = [f"{m}{x}" for m in PAPER_METRICS for x in ("", "_std", *INTERVAL)
              if f"{m}{x}" in debias.columns]
    wide = debias.set_index([*rows, "concept"])[values].unstack("concept")  # rows are unique
    wide.columns = [f"{concept}|{metric}" for metric, concept in wide.columns]
    order = [f"{c}|{m}" for c in sorted(debias["concept"].unique())
             for m in values if f"{c}|{m}" in wide.columns]
    return wide[order].reset_index()


def alpha_sweep_table(debias: pd.DataFrame) -> pd.DataFrame:
    """ICM's FD and CLIP-I per strength, from the debiasing table's groups (never averaged
    over other settings)."""
    steered = debias[debias["method"] == "icm"]
    keys = [c for c in group_keys(steered) if c != "method"]
    numbers = [f"{m}{x}" for m in ("fd", "clip_i") for x in ("", "_std", *INTERVAL)
               if f"{m}{x}" in steered.columns]
    return steered[[*keys, *numbers, "seeds"]].reset_index(drop=True)


def write_formats(table: pd.DataFrame, out: Path, name: str, caption: str = "") -> None:
    """`name`.csv (numbers: each mean and its ` std`), .md and .tex (mean ± std in one cell);
    column names from COLUMNS; the caption and the key to the short layer names with them."""
    key = LAYER_KEY if {"layers", "top_layers"} & set(table.columns) else ""
    write_table(table.rename(columns=column_name), out / f"{name}.csv")
    shown = displayed(table)
    notes = "".join(f"\n\n{text}" for text in (f"Table: {caption}" if caption else "", key)
                    if text)
    write_text(out / f"{name}.md", markdown(shown) + notes + "\n")
    write_text(out / f"{name}.tex", latex(shown, key, caption))


def column_name(column: str) -> str:
    """COLUMNS' name; `concept|metric` (the comparison table) and `metric_std`, `_low`,
    `_high` composed."""
    concept, _, metric = column.rpartition("|")
    suffix = next((x for x in ("_std", *INTERVAL) if metric.endswith(x)), "")
    name = metric.removesuffix(suffix) if suffix else metric
    return f"{concept} {COLUMNS.get(name, name)}".strip() + suffix.replace("_", " ")


def displayed(table: pd.DataFrame) -> pd.DataFrame:
    """Each metric with a `_std` column as "mean ± std" text (the mean alone for one seed);
    every number rounded to 3 decimals, so no -0.000; columns named by `column_name`."""
    shown = table.copy()
    for column in [c for c in table.columns if f"{c}_std" in table.columns]:
        low, high = (table.get(f"{column}{x}", pd.Series(np.nan, table.index)) for x in INTERVAL)
        shown[column] = [_mean_spread(*values) for values in zip(
            table[column], table[f"{column}_std"], low, high, strict=True)]
    shown = shown.drop(columns=[c for c in table.columns if c.endswith(("_std", *INTERVAL))])
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]) and column != "alpha":
            shown[column] = shown[column].round(3) + 0.0  # -0.0004 -> 0.0, not -0.000
    return shown.rename(columns=column_name)


def _mean_spread(mean: float, std: float, low: float, high: float) -> str | float:
    """"mean ± std" over seeds, or for one seed "mean [low, high]", its bootstrap interval."""
    if pd.isna(mean):
        return float("nan")
    text = _three(mean)
    if not pd.isna(std):
        return f"{text} ± {_three(std)}"
    return text if pd.isna(low) else f"{text} [{_three(low)}, {_three(high)}]"


def _three(value: float) -> str:
    return f"{round(value, 3) + 0.0:.3f}"  # + 0.0: -0.0004 prints 0.000, not -0.000


def _float_format(column: str) -> str:
    return "g" if column == "alpha" else ".3f"  # alpha 15, not 15.000


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table; a missing value (alpha of a method that adds no vector) is "-"."""
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, missingval="-",
                             floatfmt=tuple(_float_format(c) for c in table.columns))


# What pdflatex cannot take as is: TeX's special characters and the arrows of COLUMNS.
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
                 "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def latex(table: pd.DataFrame, comment: str = "", caption: str = "") -> str:
    """A booktabs tabular (`\\usepackage{booktabs}`), every cell escaped; `comment` above it;
    with a caption, inside a `table` float."""
    align = "".join("r" if _is_number_column(table[c]) else "l" for c in table)
    lines = [f"% {comment}"] if comment else []
    lines += [r"\begin{table}[t]", r"\centering", f"\\caption{{{latex_escape(caption)}}}"
              ] if caption else []
    lines += [f"\\begin{{tabular}}{{{align}}}", r"\toprule",
              " & ".join(latex_escape(str(c)) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.itertuples(index=False):
        cells = [_latex_cell(value, _float_format(column))
                 for value, column in zip(row, table.columns, strict=True)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + ([r"\end{table}"] if caption else [])
    return "\n".join(lines) + "\n"


def _is_number_column(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) or column.astype(str).str.contains(" ± ").any()


def _latex_cell(value: object, float_format: str) -> str:
    if isinstance(value, float):
        return "--" if pd.isna(value) else format(value, float_format)
    return latex_escape(str(value))


def fd_vs_clip_i(sweep: pd.DataFrame, path: Path) -> Path:
    """FD against CLIP-I, one line per setting group (model, concept, layers and whatever else
    varies), each point an alpha; error bars: ± std over seeds, or one run's bootstrap 95%
    interval."""
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    keys = [c for c in sweep.columns if c not in ("alpha", "seeds")
            and not c.startswith(("fd", "clip_i"))]
    for values, rows in sweep.groupby(keys, dropna=False):
        rows = rows.sort_values("alpha")
        named = dict(zip(keys, values, strict=True))
        label = f"{named.pop('model')}, {named.pop('concept')}: " + ", ".join(
            str(v) if k == "layers" else f"{k} {v}" for k, v in named.items())
        ax.errorbar(rows["clip_i"], rows["fd"], xerr=_error(rows, "clip_i"),
                    yerr=_error(rows, "fd"), marker="o", capsize=3, label=label)
        for _, row in rows.iterrows():
            ax.annotate(f"alpha {row['alpha']:g}", (row["clip_i"], row["fd"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{COLUMNS['clip_i']}: faithfulness to the unsteered image (same seed)")
    ax.set_ylabel(f"{COLUMNS['fd']}: distance to the target distribution")
    ax.margins(0.15)  # room for the alpha labels
    ax.set_title("Steering strength: fairness against faithfulness")
    fig.legend(fontsize=8, title=f"model, concept: steered layers, settings\n"
               f"{textwrap.fill(LAYER_KEY, 80)}", title_fontsize=8, loc="outside lower center")
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _error(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """Error bars: ± std over seeds, or the bootstrap interval of a single seed's run."""
    std = rows[f"{metric}_std"].to_numpy(float)
    low = rows.get(f"{metric}_low", pd.Series(np.nan, rows.index)).to_numpy(float)
    high = rows.get(f"{metric}_high", pd.Series(np.nan, rows.index)).to_numpy(float)
    mean = rows[metric].to_numpy(float)
    below = np.where(np.isnan(std), mean - low, std)
    above = np.where(np.isnan(std), high - mean, std)
    return np.clip(np.nan_to_num(np.stack([below, above])), 0, None)


def caption(runs: pd.DataFrame) -> str:
    """Who labelled the images and the settings every run shares (those that vary are
    columns); fairness numbers mean nothing without the labeler."""
    shared = constant_settings(runs)
    labeler = shared.pop("labeler", None)
    said = "; ".join(f"{k} {v}" for k, v in shared.items())
    return (f"Labels by {labeler}. " if labeler else "Labels: see the labeler column. ") + \
        "Mean ± std over seeds where seeds > 1; for one seed, [95% bootstrap interval over " \
        f"images]. Same in every run: {said}."


def make_tables(root: Path, out: Path) -> dict[str, pd.DataFrame]:
    out.mkdir(parents=True, exist_ok=True)
    runs = run_metrics(root)
    tables = {"localization": localization_table(root)}
    captions = {}
    if not runs.empty:
        tables["debiasing"] = debiasing_table(runs)
        tables["comparison"] = comparison_table(tables["debiasing"])
        tables["alpha_sweep"] = alpha_sweep_table(tables["debiasing"])
        captions = dict.fromkeys(("debiasing", "comparison", "alpha_sweep"), caption(runs))
    tables = {name: table for name, table in tables.items() if not table.empty}
    for name, table in tables.items():
        write_formats(table, out, name, captions.get(name, ""))
    if "alpha_sweep" in tables and not tables["alpha_sweep"].empty:
        fd_vs_clip_i(tables["alpha_sweep"], out / "fd_vs_clip_i.png")
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    args = parser.parse_args()
    tables = make_tables(args.root, args.out)
    for name, table in tables.items():
        print(f"\n## {name}\n\n{markdown(displayed(table))}")
    if "debiasing" in tables:
        print(f"\n{caption(run_metrics(args.root))}")
    print(f"\n{LAYER_KEY}\nWritten to {args.out}/ (.md, .tex for booktabs, .csv).")


if __name__ == "__main__":
    main()
