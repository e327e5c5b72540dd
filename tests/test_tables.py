import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

from icm_lab.tables import latex_escape, make_tables


def write_run(directory, method, alpha, fd, clip_i, layers=("mid_block",)):
    directory.mkdir(parents=True)
    steered = {"fd": fd, "fd_pooled": fd / 5, "fd_soft": fd / 2, "fid": 10.0, "kid": 0.01,
               "clip_t": 0.6, "clip_i": clip_i, "n_images": 8, "n_undecided": 1}
    (directory / "metrics.json").write_text(json.dumps({
        "model": "tiny_sd15", "concept": "gender", "method": method, "alpha": alpha,
        "layers": list(layers), "base": {"fd": 0.5}, "steered": steered}))


def test_tables_from_synthetic_run_directories(tmp_path):
    root = tmp_path / "outputs"
    write_run(root / "runs" / "a" / "2026-01-01", "none", None, 0.5, 1.0, layers=())
    for job, (alpha, fd, clip_i) in enumerate([(5.0, 0.3, 0.9), (15.0, 0.1, 0.8)]):
        write_run(root / "multirun" / "sweep" / str(job), "icm", alpha, fd, clip_i)
    write_run(root / "multirun" / "sweep2" / "0", "icm", 15.0, 0.2, 0.7)  # a second seed
    probes = tmp_path / "probes"
    probes.mkdir()
    pd.DataFrame({"layer": ["mid_block.attentions.0.transformer_blocks.0.attn1"] * 2
                  + ["up_blocks.1.attentions.0.transformer_blocks.0.attn2"] * 2,
                  "kind": ["attn1", "attn1", "attn2", "attn2"], "step": [0, 1, 0, 1],
                  "balanced_accuracy": [0.6, 0.9, 0.5, 0.7]}).to_parquet(probes / "scores.parquet")
    (probes / "meta.json").write_text(json.dumps({"backend": "logreg", "provenance": {
        "model": "tiny_sd15", "concept": "gender", "fingerprint": "f1"}}))
    for job in ("0", "1"):  # two jobs link the same probe set: counted once
        (root / "multirun" / "sweep" / job / "localize").symlink_to(probes)

    tables = make_tables(root, tmp_path / "tables")
    debias = markdown_rows(tmp_path / "tables" / "debiasing.md")
    assert debias[0] == ["model", "concept", "method", "alpha", "base FD", "FD ↓", "FD pooled ↓",
                         "FD_soft ↓", "FID ↓", "KID ↓", "CLIP-T ↑", "CLIP-I ↑", "runs"]
    assert ["tiny_sd15", "gender", "icm", "15", "0.500", "0.150", "0.030", "0.075", "10.000",
            "0.010", "0.600", "0.750", "2"] in debias  # the mean of two runs
    assert ["tiny_sd15", "gender", "none", "-", "0.500", "0.500", "0.100", "0.250", "10.000",
            "0.010", "0.600", "1.000", "1"] in debias  # no strength: the method adds no vector
    localization = markdown_rows(tmp_path / "tables" / "localization.md")
    assert localization[0] == ["model", "concept", "probe", "probe set", "kind",
                               "best bal. acc. ↑", "mean bal. acc. ↑",
                               "top layers (mean bal. acc.)"]
    assert ["tiny_sd15", "gender", "logreg", "f1", "attn1", "0.900", "0.750",
            "mid.a0.t0 (0.75)"] in localization
    assert ["tiny_sd15", "gender", "logreg", "f1", "attn2", "0.700", "0.600",
            "up1.a0.t0 (0.60)"] in localization
    assert len(tables["localization"]) == 2
    sweep = tables["alpha_sweep"]
    assert list(sweep["alpha"]) == [5.0, 15.0]
    assert sweep["fd"].tolist() == pytest.approx([0.3, 0.15])
    # One vocabulary: a metric has the same column name in every table and format.
    sweep_md = markdown_rows(tmp_path / "tables" / "alpha_sweep.md")[0]
    assert "FD ↓" in sweep_md and "CLIP-I ↑" in sweep_md
    for name in ("debiasing", "localization", "alpha_sweep"):
        header = markdown_rows(tmp_path / "tables" / f"{name}.md")[0]
        assert pd.read_csv(tmp_path / "tables" / f"{name}.csv").columns.tolist() == header
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
    lines = [line for line in path.read_text().splitlines() if not line.startswith("|:")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
