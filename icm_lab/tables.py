"""Paper-style tables from every run on disk (`make tables`).

    python -m icm_lab.tables [--root outputs] [--out outputs/tables]

Reads every run directory under `--root` (single runs and multirun jobs alike: any folder with
a `metrics.json` or a `localize` link) and writes, as Markdown, LaTeX and CSV:
- `localization`: per probe set (model, concept, probe backend, fingerprint) and layer kind,
  the best and mean separability (balanced accuracy) and the top layers by mean over steps;
- `debiasing`: method x concept, FD, FD_soft, FID, KID (lower is better), CLIP-T, CLIP-I
  (higher is better), averaged over runs with the same settings;
- `alpha_sweep`: FD against CLIP-I for each steering strength;
and `fd_vs_clip_i.png`, FD against CLIP-I across alpha.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from icm_lab.models.adapters import short_name  # noqa: E402

DEBIAS_METRICS = {"fd": "FD↓", "fd_soft": "FD_soft↓", "fid": "FID↓", "kid": "KID↓",
                  "clip_t": "CLIP-T↑", "clip_i": "CLIP-I↑"}


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
                "probe": meta["backend"], "probe set": provenance["fingerprint"], "kind": kind,
                "best": rows_of_kind["balanced_accuracy"].max(),
                "mean": rows_of_kind["balanced_accuracy"].mean(),
                "top layers": ", ".join(f"{short_name(n)} ({v:.2f})" for n, v in top.items()),
            })
    return pd.DataFrame(rows)


def debiasing_table(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "concept", "method", "alpha"]  # alpha is NaN for prompt and none
    table = runs.groupby(keys, sort=True, dropna=False)[list(DEBIAS_METRICS)].mean()
    table["runs"] = runs.groupby(keys, dropna=False).size()
    return table.rename(columns=DEBIAS_METRICS).reset_index()


def alpha_sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    steered = runs[runs["method"] == "icm"]
    keys = ["model", "concept", "layers", "alpha"]
    return steered.groupby(keys, sort=True)[["fd", "clip_i"]].mean().reset_index()


def write_table(table: pd.DataFrame, out: Path, name: str) -> None:
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    (out / f"{name}.tex").write_text(table.to_latex(index=False, float_format="%.3f"))


def fd_vs_clip_i(sweep: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4), constrained_layout=True)
    for (model, concept, layers), rows in sweep.groupby(["model", "concept", "layers"]):
        rows = rows.sort_values("alpha")
        ax.plot(rows["clip_i"], rows["fd"], marker="o", label=f"{model} {concept}: {layers}")
        for _, row in rows.iterrows():
            ax.annotate(f"{row['alpha']:g}", (row["clip_i"], row["fd"]), fontsize=7)
    ax.set_xlabel("CLIP-I (faithfulness to the unsteered image) →")
    ax.set_ylabel("FD (distance to the target distribution) ↓")
    ax.set_title("Steering strength: fairness against faithfulness")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120)
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
        write_table(table, out, name)
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
        print(f"\n## {name} ({len(table)} rows)\n")
        print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nwritten to {args.out}/ (.md, .tex, .csv)")


if __name__ == "__main__":
    main()
