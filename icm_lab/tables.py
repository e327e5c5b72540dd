"""Paper-style tables from every run on disk (`make tables`).

    python -m icm_lab.tables [--root outputs] [--out outputs/tables]

Reads every run directory under `--root` (single runs and multirun jobs alike: any folder with
a `metrics.json` or a `localize` link) and writes, as Markdown, LaTeX (booktabs) and CSV, with
the same column names in all three (`COLUMNS`):
- `localization`: per probe set (model, concept, probe backend, fingerprint) and layer kind,
  the best and mean separability (balanced accuracy) and the top layers by mean over steps;
- `debiasing`: method x concept, FD, FD_soft, FID, KID (lower is better), CLIP-T, CLIP-I
  (higher is better), averaged over runs with the same settings;
- `alpha_sweep`: FD against CLIP-I for each steering strength;
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
import pandas as pd  # noqa: E402

from icm_lab.files import write_figure, write_table, write_text  # noqa: E402
from icm_lab.models.adapters import short_name, short_name_key  # noqa: E402

# The one name of each column, in every table and format (↓: lower is better, ↑: higher).
COLUMNS = {
    "model": "model", "concept": "concept", "method": "method", "alpha": "alpha",
    "layers": "layers", "runs": "runs", "probe": "probe", "probe_set": "probe set",
    "kind": "kind", "best": "best bal. acc. ↑", "mean": "mean bal. acc. ↑",
    "top_layers": "top layers (mean bal. acc.)", "base_fd": "base FD",
    "fd": "FD ↓", "fd_pooled": "FD pooled ↓", "fd_soft": "FD_soft ↓", "fid": "FID ↓",
    "kid": "KID ↓",
    "clip_t": "CLIP-T ↑", "clip_i": "CLIP-I ↑",
}
DEBIAS_METRICS = ["fd", "fd_pooled", "fd_soft", "fid", "kid", "clip_t", "clip_i"]
LAYER_KEY = short_name_key()


def run_metrics(root: Path) -> pd.DataFrame:
    """One row per run with a metrics.json: its settings and steered metrics."""
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        steered = metrics["steered"]
        rows.append({
            "run": str(path.parent), "model": metrics["model"], "concept": metrics["concept"],
            "method": metrics["method"],
            "alpha": float("nan") if metrics["alpha"] is None else metrics["alpha"],
            "layers": ", ".join(short_name(n) for n in metrics["layers"]) or "-",
            "base_fd": metrics["base"]["fd"],
            **{key: steered.get(key, float("nan")) for key in DEBIAS_METRICS},
            "n_images": steered["n_images"], "n_undecided": steered["n_undecided"],
        })
    return pd.DataFrame(rows)


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
            rows.append({
                "model": provenance["model"], "concept": provenance["concept"],
                "probe": meta["backend"], "probe_set": provenance["fingerprint"], "kind": kind,
                "best": rows_of_kind["balanced_accuracy"].max(),
                "mean": rows_of_kind["balanced_accuracy"].mean(),
                "top_layers": ", ".join(f"{short_name(n)} ({v:.2f})" for n, v in top.items()),
            })
    return pd.DataFrame(rows)


def debiasing_table(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "concept", "method", "alpha"]  # alpha is NaN for prompt and none
    table = runs.groupby(keys, sort=True, dropna=False)[["base_fd", *DEBIAS_METRICS]].mean()
    table["runs"] = runs.groupby(keys, dropna=False).size()
    return table.reset_index()


def alpha_sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    steered = runs[runs["method"] == "icm"]
    keys = ["model", "concept", "layers", "alpha"]
    return steered.groupby(keys, sort=True)[["fd", "clip_i"]].mean().reset_index()


def write_formats(table: pd.DataFrame, out: Path, name: str) -> None:
    """`name`.csv, .md and .tex, all with the column names of COLUMNS; the key to the short
    layer names below the Markdown and LaTeX tables that show them."""
    shown = table.rename(columns=COLUMNS)
    key = LAYER_KEY if {"layers", "top_layers"} & set(table.columns) else ""
    write_table(shown, out / f"{name}.csv")
    write_text(out / f"{name}.md", markdown(shown) + (f"\n\n{key}" if key else "") + "\n")
    write_text(out / f"{name}.tex", latex(shown, key))


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
                 "^": r"\textasciicircum{}", "↓": r"$\downarrow$", "↑": r"$\uparrow$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def latex(table: pd.DataFrame, comment: str = "") -> str:
    """A booktabs tabular (`\\usepackage{booktabs}`), every cell escaped; `comment` above it."""
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in table)
    lines = [f"% {comment}"] if comment else []
    lines += [f"\\begin{{tabular}}{{{align}}}", r"\toprule",
              " & ".join(latex_escape(str(c)) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.itertuples(index=False):
        cells = [_latex_cell(value, _float_format(column))
                 for value, column in zip(row, table.columns, strict=True)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _latex_cell(value: object, float_format: str) -> str:
    if isinstance(value, float):
        return "--" if pd.isna(value) else format(value, float_format)
    return latex_escape(str(value))


def fd_vs_clip_i(sweep: pd.DataFrame, path: Path) -> Path:
    """FD against CLIP-I, one line per model, concept and layer set, each point an alpha."""
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    for (model, concept, layers), rows in sweep.groupby(["model", "concept", "layers"]):
        rows = rows.sort_values("alpha")
        ax.plot(rows["clip_i"], rows["fd"], marker="o", label=f"{model}, {concept}: {layers}")
        for _, row in rows.iterrows():
            ax.annotate(f"alpha {row['alpha']:g}", (row["clip_i"], row["fd"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{COLUMNS['clip_i']}: faithfulness to the unsteered image (same seed)")
    ax.set_ylabel(f"{COLUMNS['fd']}: distance to the target distribution")
    ax.margins(0.15)  # room for the alpha labels
    ax.set_title("Steering strength: fairness against faithfulness")
    fig.legend(fontsize=9, title=f"model, concept: steered layers\n{textwrap.fill(LAYER_KEY, 80)}",
               title_fontsize=8, loc="outside lower center")
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def make_tables(root: Path, out: Path) -> dict[str, pd.DataFrame]:
    out.mkdir(parents=True, exist_ok=True)
    runs = run_metrics(root)
    tables = {"localization": localization_table(root)}
    if not runs.empty:
        tables["debiasing"] = debiasing_table(runs)
        tables["alpha_sweep"] = alpha_sweep_table(runs)
    for name, table in tables.items():
        write_formats(table, out, name)
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
        print(f"\n## {name}\n\n{markdown(table.rename(columns=COLUMNS))}")
    print(f"\n{LAYER_KEY}\nWritten to {args.out}/ (.md, .tex for booktabs, .csv).")


if __name__ == "__main__":
    main()
