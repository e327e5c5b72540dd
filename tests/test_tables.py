import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from icm_lab.report.tables import latex_escape, make_tables


def write_run(directory, method, alpha, fd, clip_i, layers=("mid_block",), seed=0,
              concept="gender", labeler="clip", policy="all", fid=10.0, auto=False):
    directory.mkdir(parents=True)
    steered = {"fd": fd, "fd_pooled": fd / 5, "fd_soft": fd / 2, "kl": fd / 4,
               "deviation": fd / 3, "fid": fid, "kid": 0.01, "clip_t": 0.6, "clip_i": clip_i,
               "n_images": 8, "n_undecided": 1,
               "ci": {"fd": [fd - 0.05, fd + 0.1], "clip_i": [clip_i - 0.01, clip_i + 0.01],
                      "per_prompt": {"a": [[0.1, 0.2], [0.3, 0.4]]}}}
    hooked = alpha is not None
    (directory / "metrics.json").write_text(json.dumps({
        "model": "tiny_sd15", "concept": concept, "method": method, "alpha": alpha,
        "layers": list(layers), "step_window": {"first": 3, "last": 9} if hooked else None,
        "direction": "probe" if hooked else None, "seed": seed,
        "labeler": {"name": labeler, "min_confidence": 0.5},
        "base": {"fd": 0.5}, "steered": steered}))
    layers_cfg = "layers: {select: auto, kind: attn1, k: 1, rank_by: separability}\n" * auto
    (directory / "config.yaml").write_text(f"steer:\n  policy: {policy}\nprobe:\n  name: logreg\n"
                                           + layers_cfg)


def test_debiasing_groups_by_every_varying_setting_and_averages_seeds_only(tmp_path):
    root = tmp_path / "outputs"
    write_run(root / "a" / "0", "icm", 15.0, 0.2, 0.8, seed=0)
    write_run(root / "a" / "1", "icm", 15.0, 0.4, 0.6, seed=1)
    write_run(root / "rerun" / "0", "icm", 15.0, 0.2, 0.8, seed=0)  # same run again: once
    write_run(root / "b" / "0", "icm", 15.0, 0.9, 0.7, labeler="fairface")  # not averaged in
    write_run(root / "c" / "0", "icm", 15.0, 0.7, 0.7, policy="paper_batch")
    write_run(root / "d" / "0", "none", None, 0.5, 1.0, layers=(), fid=-0.0002)
    tables = make_tables(root, tmp_path / "tables")
    debias = tables["debiasing"]
    assert {"labeler", "steer.policy"} <= set(debias.columns)  # the settings that vary
    assert "probe.name" not in debias.columns  # the same everywhere: in the caption
    averaged = debias[(debias["labeler"] == "clip (min_confidence 0.5)")
                      & (debias["steer.policy"] == "all") & (debias["method"] == "icm")]
    assert len(averaged) == 1 and averaged["seeds"].item() == 2
    assert averaged["fd"].item() == pytest.approx(0.3)
    assert averaged["fd_std"].item() == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert len(debias) == 4
    rows = markdown_rows(tmp_path / "tables" / "debiasing.md")
    header = rows[0]
    for name in ("FD ↓", "FD pooled ↓", "KL ↓", "deviation ↓", "undecided", "FID ↓",
                 "CLIP-I ↑", "labeler", "steer.policy", "seeds"):
        assert name in header, name
    icm = next(r for r in rows if r[header.index("seeds")] == "2")
    assert icm[header.index("FD ↓")] == "0.300 ± 0.141"
    assert icm[header.index("undecided")] == "0.125 ± 0.000"
    none = next(r for r in rows if r[header.index("method")] == "none")
    assert none[header.index("FID ↓")] == "0.000"  # not -0.000
    assert none[header.index("FD ↓")] == "0.500 [0.450, 0.600]"  # one seed: its interval
    text = (tmp_path / "tables" / "debiasing.md").read_text()
    assert "Table: Labels: see the labeler column." in text and "probe.name logreg" in text
    csv = pd.read_csv(tmp_path / "tables" / "debiasing.csv")
    assert {"FD ↓", "FD ↓ std", "FD ↓ low", "FD ↓ high"} <= set(csv.columns)
    check_latex(tmp_path / "tables")


def test_layers_chosen_by_auto_follow_the_seed_and_do_not_split_the_group(tmp_path):
    """layers=auto ranks on the seed's probe split: other seeds may pick other layers, which is
    an outcome of the seed (shown), not a setting (grouped by)."""
    root = tmp_path / "outputs"
    for seed, layer in ((0, "up_blocks.1.attentions.0.transformer_blocks.0.attn1"),
                        (1, "mid_block.attentions.0.transformer_blocks.0.attn1")):
        write_run(root / str(seed), "icm", 15.0, 0.1 * (seed + 1), 0.9, layers=(layer,),
                  seed=seed, auto=True)
    debias = make_tables(root, tmp_path / "tables")["debiasing"]
    assert len(debias) == 1 and debias["seeds"].item() == 2
    assert debias["steered_layers"].item() == "mid.a0.t0 / up1.a0.t0"
    text = (tmp_path / "tables" / "debiasing.md").read_text()
    assert "layers auto: top 1 attn1 by separability" in text  # the setting, in the caption


def test_comparison_table_has_the_papers_layout(tmp_path):
    root = tmp_path / "outputs"
    for concept, fd in (("gender", 0.1), ("age", 0.3)):
        for method, alpha in (("none", None), ("icm", 15.0)):
            write_run(root / concept / method, method, alpha, fd if alpha else 0.5, 0.9,
                      concept=concept, layers=(f"{concept}_layer",) if alpha else ())
    comparison = markdown_rows(tmp_path / "tables" / "comparison.md") if make_tables(
        root, tmp_path / "tables") else None
    assert comparison[0] == ["model", "method", "alpha", "age FD ↓", "age FID ↓", "age CLIP-T ↑",
                             "age CLIP-I ↑", "gender FD ↓", "gender FID ↓", "gender CLIP-T ↑",
                             "gender CLIP-I ↑"]
    icm = next(r for r in comparison if r[1] == "icm")
    assert (icm[3], icm[7]) == ("0.300 [0.250, 0.400]", "0.100 [0.050, 0.200]")  # one row
    text = (tmp_path / "tables" / "debiasing.md").read_text()
    assert "Labels by clip (min_confidence 0.5)." in text


def test_tables_from_synthetic_run_directories(tmp_path):
    root = tmp_path / "outputs"
    write_run(root / "runs" / "a" / "2026-01-01", "none", None, 0.5, 1.0, layers=())
    for job, (alpha, fd, clip_i) in enumerate([(5.0, 0.3, 0.9), (15.0, 0.1, 0.8)]):
        write_run(root / "multirun" / "sweep" / str(job), "icm", alpha, fd, clip_i)
    write_run(root / "multirun" / "sweep2" / "0", "icm", 15.0, 0.2, 0.7, seed=1)
    probes = tmp_path / "probes"
    probes.mkdir()
    pd.DataFrame({"layer": ["mid_block.attentions.0.transformer_blocks.0.attn1"] * 2
                  + ["up_blocks.1.attentions.0.transformer_blocks.0.attn2"] * 2,
                  "kind": ["attn1", "attn1", "attn2", "attn2"], "step": [0, 1, 0, 1],
                  "balanced_accuracy": [0.6, 0.9, 0.5, 0.7],  # mean over folds, and std:
                  "balanced_accuracy_std": [0.1, 0.05, 0.02, 0.03]}).to_parquet(
        probes / "scores.parquet")
    (probes / "meta.json").write_text(json.dumps({"backend": "logreg", "provenance": {
        "model": "tiny_sd15", "concept": "gender", "fingerprint": "f1"}}))
    for job in ("0", "1"):  # two jobs link the same probe set: counted once
        (root / "multirun" / "sweep" / job / "localize").symlink_to(probes)

    tables = make_tables(root, tmp_path / "tables")
    debias = markdown_rows(tmp_path / "tables" / "debiasing.md")
    assert debias[0][:4] == ["model", "concept", "method", "alpha"]
    assert ["tiny_sd15", "gender", "icm", "15"] == debias[2][:4] or any(
        r[:4] == ["tiny_sd15", "gender", "icm", "15"] and "0.150 ± 0.071" in r for r in debias)
    localization = markdown_rows(tmp_path / "tables" / "localization.md")
    assert localization[0] == ["model", "concept", "probe", "probe set", "kind",
                               "best bal. acc. ↑", "mean bal. acc. ↑",
                               "top layers (mean bal. acc.)"]
    assert ["tiny_sd15", "gender", "logreg", "f1", "attn1", "0.900 ± 0.050", "0.750",
            "mid.a0.t0 (0.75)"] in localization
    assert ["tiny_sd15", "gender", "logreg", "f1", "attn2", "0.700 ± 0.030", "0.600",
            "up1.a0.t0 (0.60)"] in localization
    assert len(tables["localization"]) == 2
    sweep = tables["alpha_sweep"]
    assert list(sweep["alpha"]) == [5.0, 15.0]
    assert sweep["fd"].tolist() == pytest.approx([0.3, 0.15])
    # One vocabulary: a metric has the same column name in every table and format.
    sweep_md = markdown_rows(tmp_path / "tables" / "alpha_sweep.md")[0]
    assert "FD ↓" in sweep_md and "CLIP-I ↑" in sweep_md
    for name in ("debiasing", "localization", "alpha_sweep", "comparison"):
        header = markdown_rows(tmp_path / "tables" / f"{name}.md")[0]
        assert set(header) <= set(pd.read_csv(tmp_path / "tables" / f"{name}.csv").columns)
        for suffix in ("md", "tex", "csv"):
            assert (tmp_path / "tables" / f"{name}.{suffix}").exists()
    assert (tmp_path / "tables" / "fd_vs_clip_i.png").stat().st_size > 5000
    check_latex(tmp_path / "tables")


def check_latex(folder):
    """Every .tex is escaped booktabs; with pdflatex installed, it compiles."""
    texts = {path.name: path.read_text() for path in sorted(folder.glob("*.tex"))}
    for name, text in texts.items():
        body = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
        assert "\\toprule" in body and "\\bottomrule" in body, name
        assert re.search(r"(?<!\\)_", body) is None, name  # every underscore escaped
        assert body.isascii(), name  # arrows as $\downarrow$, nothing pdflatex rejects
    assert "FD\\_soft $\\downarrow$" in texts["debiasing.tex"]
    if shutil.which("pdflatex") is None:
        return
    body = "\n".join(f"\\input{{{name}}}\\par" for name in texts)
    (folder / "all.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\n"
                                    f"\\begin{{document}}\n{body}\n\\end{{document}}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                             "all.tex"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]


def test_latex_escapes_what_tex_treats_specially():
    assert latex_escape("FD_soft ↓ & 50% #1 {a} ~^$\\") == (
        r"FD\_soft $\downarrow$ \& 50\% \#1 \{a\} \textasciitilde{}\textasciicircum{}\$"
        r"\textbackslash{}")


def markdown_rows(path):
    lines = [line for line in path.read_text().splitlines()
             if line.startswith("|") and not line.startswith("|:")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
