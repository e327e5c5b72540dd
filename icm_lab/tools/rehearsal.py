"""The GPU rehearsal: the full-size architectures on one GPU, and the figures they give.

    python -m icm_lab.tools.rehearsal OUT_DIR            # SD1.5, SDXL and Sana at full size
    python -m icm_lab.tools.rehearsal OUT_DIR --smoke    # the same script on the tiny twins (CPU)

`make gpu-kit` fetches the wheels the GPU machine lacks; `make gpu-rehearsal OUT=DIR` installs
them into a temporary folder and runs this (docs/gpu.md). Every section runs even if another
failed; OUT_DIR gets `rehearsal.json` (every figure) and `rehearsal.md` (the same, for reading).
Sections: `sd15` (images/s of the plain pipeline, recording every hook point and ICM steering;
peak memory; host synchronisations per denoising step), `pipeline` (every stage at reduced
counts), `probes` (logreg against scikit-learn on every core), `sdxl` and `sana` (one batch
recorded and one steered at full size), `hours` (the paper's runs, extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from joblib import Parallel, delayed
from omegaconf import OmegaConf

from icm_lab.config.compose import SWEEPS_DIR, compose_config
from icm_lab.core.layers import LayerRegistry
from icm_lab.core.selection import step_window
from icm_lab.engine.generation import STATELESS_SCHEDULERS
from icm_lab.engine.hooks import DenoiserHooks
from icm_lab.models.adapters import denoiser, layer_registry
from icm_lab.models.loading import ModelSpec
from icm_lab.probing.probes import Probe, fit_probes, scores, width_batches
from icm_lab.stages.components import build
from icm_lab.tools.bench import (
    icm_interventions,
    sd15_probe_problem,
    sklearn_layer,
    start_workers,
    sync,
)

# The CUDA runtime calls that make the host wait for the device.
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize",
              "cudaMemcpy")
TABLES_ALPHAS = 4  # `make tables`' alpha sweep (Makefile: steer.alpha=0,8,16,32)
GOALS = {"record": 0.90, "steer": 0.98, "logreg_speedup": 10.0}


@dataclass(frozen=True)
class Scale:
    """What one rehearsal runs: full size on a GPU, or the tiny twins on the CPU."""

    sd15: str
    sdxl: str
    sana: str
    dtype: str
    steps: int
    batches: tuple[int, ...]
    reps: int
    probe_n: int
    probe_steps: int
    pipeline: tuple[str, ...]  # overrides of the SD1.5 collect run
    toy: tuple[str, ...]  # overrides of the toy world's run of every stage
    one_batch: tuple[str, ...] = ()  # overrides of the SDXL and Sana batches


FULL = Scale(sd15="sd15_random", sdxl="sdxl_random", sana="sana_random", dtype="float16",
             steps=50, batches=(8, 16), reps=4, probe_n=1024, probe_steps=50,
             pipeline=("model=sd15_random", "concept=gender", "clip=tiny", "model.dtype=float16",
                       "model.steps=20", "model.batch_size=16", "collect.n_images=64"),
             toy=())
SMOKE = Scale(sd15="tiny_sd15", sdxl="tiny_sdxl", sana="tiny_sana", dtype="float32", steps=4,
              batches=(2,), reps=1, probe_n=64, probe_steps=4,
              pipeline=("model=tiny_sd15", "concept=gender", "model.steps=4",
                        "collect.n_images=8"),
              toy=("collect.n_images=96", "eval.n_images_per_prompt=4", "causal.n_images=4",
                   "localize.folds=2"),
              one_batch=("model.steps=4", "model.batch_size=2"))


def load(model: str, *overrides: str) -> tuple[ModelSpec, DiffusionPipeline, LayerRegistry]:
    """A model's spec, pipeline and layer registry, as a run loads them."""
    spec = build(compose_config([f"model={model}", *overrides]).model, "model")
    pipe = spec.load()
    return spec, pipe, layer_registry(pipe, spec.resolution)


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sides(pipe: DiffusionPipeline, registry: LayerRegistry, batch: int, steps: int,
          steer_layers: list[str]) -> dict[str, Callable[[], AbstractContextManager]]:
    """What is timed: the plain pipeline, recording every hook point, steering three layers."""
    return {
        "plain": nullcontext,
        "record": lambda: DenoiserHooks(pipe, registry, record=registry.names()),
        "steer": lambda: DenoiserHooks(pipe, registry, interventions=icm_interventions(
            registry, batch, steps, steer_layers)),
    }


def generate(pipe: DiffusionPipeline, spec: ModelSpec, batch: int, steps: int | None = None
             ) -> None:
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    kwargs = spec.pipeline_kwargs() | ({"num_inference_steps": steps} if steps else {})
    pipe(["a photo of a person"] * batch, generator=generators, output_type="pt", **kwargs)


PROFILED_STEPS = (4, 8)  # two generations: their difference is what the steps add


def count_syncs(pipe: DiffusionPipeline, spec: ModelSpec, registry: LayerRegistry, batch: int,
                steer_layers: list[str]) -> dict[str, Any]:
    """Host synchronisations of each side: the CUDA runtime calls that wait (profiler) in a
    generation of 4 and of 8 steps. Their difference over 4 is what one denoising step makes;
    the rest (prompt encoding, the schedule, decoding, moving steering vectors) is made once per
    generation. The Python lines that asked for them come from torch's sync debug mode."""
    if not torch.cuda.is_available():
        return {name: {"per_step": None, "note": "no CUDA device"} for name in ("plain", "record",
                                                                               "steer")}
    from torch.profiler import ProfilerActivity, profile

    result = {}
    few, many = PROFILED_STEPS
    for name in ("plain", "record", "steer"):
        calls, sites = {}, {}
        for steps in PROFILED_STEPS:
            hooks = sides(pipe, registry, batch, steps, steer_layers)[name]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        with hooks():
                            generate(pipe, spec, batch, steps)
                        sync()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            calls[steps] = sum(1 for e in prof.events() if e.name in SYNC_CALLS)
            for w in caught:
                if "synchroniz" in str(w.message):
                    key = f"{Path(w.filename).name}:{w.lineno}"
                    sites[key] = sites.get(key, 0) + 1
        per_step = (calls[many] - calls[few]) / (many - few)
        result[name] = {"per_step": per_step, "per_generation": calls[few] - few * per_step,
                        "sites": sorted(sites.items(), key=lambda item: -item[1])[:12]}
    for name in ("record", "steer"):  # what the hooks add to the plain pipeline's own
        result[name]["added_per_step"] = result[name]["per_step"] - result["plain"]["per_step"]
    return result


def sd15(scale: Scale, out: Path) -> dict[str, Any]:
    """SD1.5 at full size: images/s and peak memory of each side per batch size; host syncs at
    the smallest batch (they do not depend on it)."""
    spec, pipe, registry = load(scale.sd15, f"model.dtype={scale.dtype}",
                                f"model.steps={scale.steps}")
    steer_layers = list(compose_config(["layers=paper_sd15"]).layers.select)
    result: dict[str, Any] = {"model": spec.name, "resolution": spec.resolution,
                              "steps": spec.steps, "guidance": spec.guidance,
                              "dtype": str(pipe.dtype), "hook_points": len(registry.names()),
                              "steered_layers": steer_layers, "batches": {}}
    for batch in scale.batches:
        contexts = sides(pipe, registry, batch, spec.steps, steer_layers)
        seconds: dict[str, list[float]] = {name: [] for name in contexts}
        peaks: dict[str, float | None] = {}
        for name, hooks in contexts.items():  # warm-up, and each side's own peak memory
            reset_peak()
            with hooks():
                generate(pipe, spec, batch)
            sync()
            peaks[name] = peak_gib()
        for _ in range(scale.reps):  # interleaved, so drifts hit every side alike
            for name, hooks in contexts.items():
                sync()
                start = time.perf_counter()
                with hooks():
                    generate(pipe, spec, batch)
                sync()
                seconds[name].append(time.perf_counter() - start)
        rows = {name: {"images_per_s": batch / min(times), "seconds": times,
                       "peak_gib": peaks[name]} for name, times in seconds.items()}
        for name in ("record", "steer"):
            rows[name]["vs_plain"] = min(seconds["plain"]) / min(seconds[name])
            rows[name]["vs_plain_median"] = (statistics.median(seconds["plain"])
                                             / statistics.median(seconds[name]))
            rows[name]["goal"] = GOALS[name]
            rows[name]["met"] = rows[name]["vs_plain"] >= GOALS[name]
        result["batches"][str(batch)] = rows
        print(f"  sd15 batch {batch}: " + ", ".join(
            f"{n} {r['images_per_s']:.2f} img/s" for n, r in rows.items()), flush=True)
    result["host_syncs"] = count_syncs(pipe, spec, registry, min(scale.batches), steer_layers)
    del pipe
    return result


def pipeline(scale: Scale, out: Path) -> dict[str, Any]:
    """Real runs, each in its own process as a user starts it: the toy world's default run
    (every stage, with real weights and labels) on this device, and SD1.5's full architecture
    through collect (its random images get one label from a random CLIP, so nothing past
    collect would be meaningful)."""
    runs = {"toy": ["stages=[collect,localize,causal,steer,evaluate]", *scale.toy],
            "sd15": ["stages=[collect]", *scale.pipeline]}
    return {name: run_icm_lab(out / f"pipeline-{name}", overrides)
            for name, overrides in runs.items()}


def run_icm_lab(root: Path, overrides: list[str]) -> dict[str, Any]:
    """`python -m icm_lab OVERRIDES` in `root`: its time, denoiser calls, artefacts and FD."""
    overrides = [*overrides, f"paths.root={root}", f"hydra.run.dir={root}/run"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "icm_lab", *overrides], capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    seconds = time.perf_counter() - start
    root.mkdir(parents=True, exist_ok=True)
    (root.parent / f"{root.name}.log").write_text(done.stdout + done.stderr)
    metrics_file = root / "run" / "metrics.json"
    artefacts = sorted(p.parent.name for p in (root / "outputs" / "artefacts").glob("*/*")
                       if p.is_dir())
    result = {"overrides": overrides, "exit_status": done.returncode, "seconds": seconds,
              "artefacts": artefacts}
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        result["denoiser_calls"] = metrics.get("denoiser_calls")
        result["fd"] = {side: metrics.get(side, {}).get("fd") for side in ("base", "steered")}
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides[:3])} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return result


def probes(scale: Scale, out: Path) -> dict[str, Any]:
    """logreg on the GPU (or the CPU) against scikit-learn over joblib on every core (workers
    started before the clock, one BLAS thread each), on the SD1.5-shaped probes of `make
    bench`'s probe benchmark. logreg fits layers of one width together up to `probe.batch_mb`,
    as localize does; scikit-learn one probe at a time, as it must."""
    n = scale.probe_n
    infos, layers, y, train, test = sd15_probe_problem(n, scale.probe_steps)
    widths = [layer.width for layer in infos]
    by_name = dict(zip([layer.name for layer in infos], layers, strict=True))
    arrays = [x.permute(1, 0, 2).contiguous().numpy() for x in layers]
    jobs = os.cpu_count() or 1
    start_workers(jobs, arrays[0], y.numpy())
    start = time.perf_counter()
    reference = Parallel(n_jobs=jobs)(delayed(sklearn_layer)(x, y.numpy(), train.numpy(),
                                                             test.numpy()) for x in arrays)
    sklearn_s = time.perf_counter() - start
    reference = np.concatenate([b for b, _ in reference])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fit_probes("logreg", layers[0][:64, :2].permute(1, 0, 2).to(device), y[:64].to(device), 2)
    batch_mb = Probe("logreg").batch_mb
    batches = width_batches(infos, n, scale.probe_steps, batch_mb)
    sync()
    start = time.perf_counter()
    balanced = []
    for batch in batches:  # layers of one width fitted together, as localize batches them
        x = torch.cat([by_name[layer.name].to(device).transpose(0, 1) for layer in batch])
        fit = fit_probes("logreg", x[:, train.to(device)], y[train].to(device), 2)
        logits = fit.logits(x[:, test.to(device)])
        balanced.append(scores(logits, y[test].to(device), 2)["balanced_accuracy"].cpu())
    sync()
    logreg_s = time.perf_counter() - start
    delta = np.abs(torch.cat(balanced).numpy() - reference)
    return {"probes": len(widths) * scale.probe_steps, "n": n, "widths": sorted(set(widths)),
            "sklearn": {"workers": jobs, "threads_per_worker": 1, "seconds": sklearn_s},
            "logreg": {"device": device, "seconds": logreg_s, "solver_calls": len(batches),
                       "batch_mb": batch_mb},
            "speedup": sklearn_s / logreg_s, "goal": GOALS["logreg_speedup"],
            "delta_balanced_accuracy": {"mean": float(delta.mean()), "max": float(delta.max())}}


def one_batch(model: str, scale: Scale) -> dict[str, Any]:
    """SDXL or Sana at full size: one batch recorded (collect) and one steered, with shapes."""
    spec, pipe, registry = load(model, *scale.one_batch)
    batch = spec.batch_size
    attn1 = registry.names("attn1")
    steer_layers = attn1[max(0, len(attn1) // 2 - 1):][:3]  # three in the middle
    result: dict[str, Any] = {"model": spec.name, "resolution": spec.resolution,
                              "steps": spec.steps, "batch": batch,
                              "dtypes": {"text_encoder": str(pipe.text_encoder.dtype),
                                         "vae": str(pipe.vae.dtype),
                                         "denoiser": str(denoiser(pipe).dtype)},
                              "hook_points": len(registry.names()),
                              "parameters_billion": sum(
                                  p.numel() for p in denoiser(pipe).parameters()) / 1e9}
    generate(pipe, spec, batch, steps=2)  # warm-up: kernels chosen, memory pools filled
    for name, hooks in sides(pipe, registry, batch, spec.steps, steer_layers).items():
        if name == "plain":
            continue
        reset_peak()
        sync()
        start = time.perf_counter()
        with hooks() as engine:
            generate(pipe, spec, batch)
        sync()
        seconds = time.perf_counter() - start
        row = {"seconds": seconds, "images_per_s": batch / seconds, "peak_gib": peak_gib()}
        if name == "record":
            recording = engine.recording()
            row["recorded_layers"] = len(recording)
            row["shapes"] = {k: list(v.shape) for k, v in list(recording.items())[:3]}
            row["recorded_mib"] = sum(v.nbytes for v in recording.values()) / 2**20
        result[name] = row
        print(f"  {model} {name}: {row['images_per_s']:.3f} img/s, peak {row['peak_gib']}",
              flush=True)
    del pipe
    return result


def hours(report: dict[str, Any]) -> dict[str, Any]:
    """Hours of generation for the paper's runs at the measured rates (image-steps per second,
    at the experiment's batch size where it was measured): collect at the recording rate, base
    images at the plain rate, steered images at the steering rate from the steering start when
    the scheduler lets them continue from the shared prefix, else from step 0. `make tables`
    adds one set of steered images per steering method and per alpha. SDXL and Sana are timed
    recording and steering only: their plain rate is the steering rate."""
    rates: dict[str, dict[int, dict[str, float]]] = {}  # family -> batch -> side -> rate
    if "batches" in report.get("sd15", {}):
        sd = report["sd15"]
        rates["sd15"] = {int(batch): {side: row["images_per_s"] * sd["steps"]
                                      for side, row in rows.items()}
                         for batch, rows in sd["batches"].items()}
    for family in ("sdxl", "sana"):
        row = report.get(family, {})
        if "record" in row:
            steer = row["steer"]["images_per_s"] * row["steps"]
            rates[family] = {row["batch"]: {"plain": steer, "steer": steer,
                                            "record": row["record"]["images_per_s"] * row["steps"]}}
    methods = str(OmegaConf.load(SWEEPS_DIR / "methods.yaml").hydra.sweeper.params.method)
    steered_jobs = len([m for m in methods.split(",") if m.strip() != "none"]) + TABLES_ALPHAS
    estimates = {}
    for experiment in ("paper_sd15_gender", "paper_sd15_age", "paper_sd15_race",
                       "paper_sdxl_gender", "paper_sana_gender"):
        cfg = compose_config([f"experiment={experiment}"])
        family = cfg.model.name
        if family not in rates:
            continue
        batch = min(rates[family], key=lambda b: abs(b - cfg.model.batch_size))
        rate, steps = rates[family][batch], cfg.model.steps
        n_eval = len(cfg.concept.eval_prompts) * cfg.eval.n_images_per_prompt
        shared = cfg.model.scheduler in STATELESS_SCHEDULERS  # null: the checkpoint's, unknown
        start = step_window(cfg.steer.start, cfg.steer.end, steps).start if shared else 0
        one = {"collect": cfg.collect.n_images * steps / rate["record"],
               "base": n_eval * steps / rate["plain"],
               "steered": n_eval * (steps - start) / rate["steer"]}
        tables = one["collect"] + one["base"] + steered_jobs * one["steered"]
        estimates[experiment] = {"images": {"collect": cfg.collect.n_images, "eval": n_eval},
                                 "rate_batch": batch, "steered_from_step": start,
                                 "hours": {k: v / 3600 for k, v in one.items()},
                                 "run_hours": sum(one.values()) / 3600,
                                 "make_tables_hours": tables / 3600}
    return {"rates_image_steps_per_s": rates, "make_tables_steered_jobs": steered_jobs,
            "experiments": estimates,
            "note": "generation only: labelling, probes and evaluation are not included"}


def environment() -> dict[str, Any]:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(), "load": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


@contextmanager
def section(report: dict[str, Any], name: str) -> Iterator[None]:
    """One section: its time, and its error instead of the rest's loss."""
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    try:
        yield
    except Exception as error:  # a failed section is a finding; the others still run
        report[name] = {"error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()[-3000:]}
        print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
    finally:
        if isinstance(report.get(name), dict):
            report[name]["section_seconds"] = time.perf_counter() - start
        reset_peak()


def markdown(report: dict[str, Any]) -> str:
    """The report for reading: tables where there are tables, every failure with its error."""
    env = report["environment"]
    lines = ["# GPU rehearsal", "", f"`{report['command']}`", "",
             f"{env.get('gpu', 'no GPU')}, {env['cpus']} cores at load {env['load'][0]:.2f}; "
             f"Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}", ""]
    if report["scale"]["sd15"] != "sd15_random":
        lines += ["**Smoke scale: tiny random twins on the CPU. Every figure below checks the "
                  "script, not the hardware; the hours are meaningless.**", ""]
    failed = [(name, value["error"]) for name, value in report.items()
              if isinstance(value, dict) and "error" in value]
    lines += [f"**{name} failed**: `{error}` (traceback in rehearsal.json)"
              for name, error in failed]
    sd = report.get("sd15", {})
    if "batches" in sd:
        lines += ["", f"## {sd['model']}: {sd['resolution']} px, {sd['steps']} steps, guidance "
                  f"{sd['guidance']}, {sd['dtype']}", "",
                  "| batch | side | images/s | vs plain, fastest (median) | goal | peak GPU GiB |",
                  "|---|---|---|---|---|---|"]
        for batch, rows in sd["batches"].items():
            for name, row in rows.items():
                ratio = (f"{row['vs_plain']:.3f} ({row['vs_plain_median']:.3f})"
                         if "vs_plain" in row else "")
                goal = (f"≥ {row['goal']} {'met' if row['met'] else 'not met'}"
                        if "goal" in row else "")
                peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
                lines.append(f"| {batch} | {name} | {row['images_per_s']:.3f} | {ratio} | "
                             f"{goal} | {peak} |")
        syncs = sd["host_syncs"]
        lines += ["", "Host synchronisations (CUDA runtime calls that wait):", "",
                  "| side | per denoising step | added by the hooks per step | once per "
                  "generation |", "|---|---|---|---|"]
        for name, row in syncs.items():
            if row.get("per_step") is None:
                lines.append(f"| {name} | n/a ({row.get('note')}) | | |")
                continue
            lines.append(f"| {name} | {row['per_step']:.1f} | {row.get('added_per_step', '')} "
                         f"| {row['per_generation']:.1f} |")
    for family in ("sdxl", "sana"):
        row = report.get(family, {})
        if "record" in row:
            lines += ["", f"## {row['model']}: {row['resolution']} px, {row['steps']} steps, "
                      f"batch {row['batch']}, {row['parameters_billion']:.2f} B denoiser "
                      f"parameters, {row['dtypes']}", "",
                      "| side | images/s | peak GPU GiB |", "|---|---|---|"]
            for side in ("record", "steer"):
                peak = row[side]["peak_gib"]
                lines.append(f"| {side} | {row[side]['images_per_s']:.3f} | "
                             f"{'n/a (CPU)' if peak is None else f'{peak:.2f}'} |")
            lines.append(f"\nRecorded {row['record']['recorded_layers']} layers, "
                         f"{row['record']['recorded_mib']:.1f} MiB; e.g. "
                         f"{next(iter(row['record']['shapes'].items()))}")
    probes = report.get("probes", {})
    if "speedup" in probes:
        lines += ["", f"## Probes: {probes['probes']} probes, N = {probes['n']}", "",
                  f"scikit-learn, joblib {probes['sklearn']['workers']} workers x 1 thread: "
                  f"{probes['sklearn']['seconds']:.1f} s; logreg on {probes['logreg']['device']}: "
                  f"{probes['logreg']['seconds']:.2f} s: **{probes['speedup']:.1f}x** (goal ≥ "
                  f"{probes['goal']}); |Δ balanced accuracy| mean "
                  f"{probes['delta_balanced_accuracy']['mean']:.4f}, max "
                  f"{probes['delta_balanced_accuracy']['max']:.3f}"]
    runs = report.get("pipeline", {})
    if "error" not in runs and runs:
        lines += ["", "## Runs", "",
                  "| run | exit | seconds | denoiser calls | FD base → steered |",
                  "|---|---|---|---|---|"]
        for name, run in runs.items():
            if isinstance(run, dict) and "exit_status" in run:
                fd = run.get("fd", {})
                shown = (f"{fd['base']:.3f} → {fd['steered']:.3f}" if fd.get("steered")
                         is not None else "")
                lines.append(f"| {name} | {run['exit_status']} | {run['seconds']:.1f} | "
                             f"{run.get('denoiser_calls', '')} | {shown} |")
    estimates = report.get("hours", {}).get("experiments", {})
    if estimates:
        lines += ["", "## Hours of generation at these rates", "",
                  "| experiment | one run | make tables |", "|---|---|---|"]
        lines += [f"| {name} | {row['run_hours']:.2f} h | {row['make_tables_hours']:.2f} h |"
                  for name, row in estimates.items()]
    return "\n".join(lines) + "\n"


SECTIONS: dict[str, Callable[[Scale, Path], dict[str, Any]]] = {
    "sd15": sd15, "pipeline": pipeline, "probes": probes,
    "sdxl": lambda scale, out: one_batch(scale.sdxl, scale),
    "sana": lambda scale, out: one_batch(scale.sana, scale),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m icm_lab.tools.rehearsal", description=__doc__.split("\n\n")[0],
        epilog="On the GPU machine: bash icm_lab/tools/gpu_rehearsal.sh OUT [args] (docs/gpu.md)")
    parser.add_argument("out", type=Path, help="folder for rehearsal.json and rehearsal.md")
    parser.add_argument("--smoke", action="store_true", help="the tiny twins on the CPU")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run this section only; repeat for several (hours always runs)")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(["python -m icm_lab.tools.rehearsal",
                                                   *(argv or sys.argv[1:])]),
                              "scale": asdict(scale), "environment": environment()}
    began = time.perf_counter()
    for name in args.only or SECTIONS:
        with section(report, name):
            report[name] = SECTIONS[name](scale, args.out)
        write(report, args.out)  # a later section's crash or time-out keeps the earlier ones
    with section(report, "hours"):
        report["hours"] = hours(report)
    report["seconds"] = time.perf_counter() - began
    write(report, args.out)
    failed = [name for name, value in report.items()
              if isinstance(value, dict) and "error" in value]
    print(f"rehearsal: {report['seconds']:.0f} s; {args.out / 'rehearsal.md'}"
          + (f"; failed: {failed}" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


def write(report: dict[str, Any], out: Path) -> None:
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "rehearsal.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
