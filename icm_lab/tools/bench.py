"""Performance figures, measured side by side in one run (`make bench`).

Each benchmark times a baseline and a variant on the same inputs, interleaving repetitions so
that drifts in machine load hit both alike, and reports the ratio of the medians.

    python -m icm_lab.tools.bench [--model tiny_sd15] [--steps 20] [--batch 8] [--reps 15]
        [overrides...]

On a GPU: python -m icm_lab.tools.bench --model sd15_random model.device=cuda model.dtype=float16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
from joblib import Parallel, delayed
from omegaconf import OmegaConf

from icm_lab.app.runner import run
from icm_lab.config.compose import CONFIG_DIR, compose_config
from icm_lab.core.layers import LayerInfo, LayerRegistry
from icm_lab.core.selection import step_window
from icm_lab.engine import hooks as hooks_module
from icm_lab.engine.hooks import AddVector, DenoiserHooks, ForwardHook
from icm_lab.io.store import ActivationStore, StoreWriter
from icm_lab.models.adapters import layer_registry
from icm_lab.probing.probes import (
    fit_logreg_chunk,
    fit_probes,
    matvec,
    rmatvec,
    scores,
    single_threaded,
    standardised_chunks,
    targets,
)
from icm_lab.stages.components import build

TARGETS = {"record": {"cpu": 0.10, "cuda": 0.05}, "steer": {"cpu": 0.03, "cuda": 0.02}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pair(baseline: Callable[[], object], variant: Callable[[], object], reps: int):
    """Seconds per call of each, interleaved after one warm-up call of each: the minimums (the
    least noisy estimate of the intrinsic cost on a shared machine) and the medians."""
    baseline(), variant()
    times: dict[str, list[float]] = {"baseline": [], "variant": []}
    for _ in range(reps):
        for name, fn in (("baseline", baseline), ("variant", variant)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return (min(times["baseline"]), min(times["variant"]),
            statistics.median(times["baseline"]), statistics.median(times["variant"]))


class HookTimer:
    """Times the engine's hooks while active (their `before` and `after`, not the forwards they
    wrap): the engine's own cost, free of the machine-load noise that blurs whole-generation
    ratios on a shared CPU."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._original = hooks_module.wrap_forward

    def _timed(self, step: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed

    def __enter__(self) -> HookTimer:
        def wrap_timed(module: torch.nn.Module, hook: ForwardHook):
            timed = ForwardHook()
            timed.before, timed.after = self._timed(hook.before), self._timed(hook.after)
            timed.call = hook.call
            return self._original(module, timed)

        hooks_module.wrap_forward = wrap_timed
        return self

    def __exit__(self, *exc) -> None:
        hooks_module.wrap_forward = self._original


def _hook_benchmark(args: argparse.Namespace, overrides: list[str], name: str,
                    hooks_for: Callable) -> None:
    """Plain generation against generation inside `DenoiserHooks(**hooks_for(pipe, registry))`."""
    cfg = build(compose_config([f"model={args.model}", *overrides]).model, "model")
    pipe = cfg.load()
    registry = layer_registry(pipe, cfg.resolution)
    kwargs = cfg.pipeline_kwargs() | {"num_inference_steps": args.steps}
    prompts = ["a photo of a person"] * args.batch
    hook_kwargs = hooks_for(registry, args)

    def generate():
        generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        return pipe(prompts, generator=generators, output_type="latent", **kwargs)

    def generate_hooked():
        with DenoiserHooks(pipe, registry, **hook_kwargs) as hooks:
            generate()
        return hooks.recording() if hook_kwargs.get("record") else None

    timings = time_pair(generate, generate_hooked, args.reps)
    with HookTimer() as timer:
        generate_hooked()
    device = pipe.device.type
    layers = len(hook_kwargs.get("record", hook_kwargs.get("interventions", [])))
    setting = (f"{cfg.name}, {layers} layers, {args.steps} steps, batch {args.batch}, "
               f"{cfg.resolution}px, {device}/{str(pipe.dtype).removeprefix('torch.')}")
    _report(name, setting, *timings, TARGETS[name].get(device, TARGETS[name]["cpu"]))
    print(f"  time inside the hooks: {timer.seconds * 1e3:.1f} ms per generation "
          f"({timer.seconds / timings[0]:.1%} of the plain minimum; {timer.calls} calls)",
          flush=True)


def bench_record(args: argparse.Namespace, overrides: list[str]) -> None:
    """Recording every attn1, attn2 and bottleneck layer against the plain pipeline."""
    _hook_benchmark(args, overrides, "record",
                    lambda registry, args: {"record": registry.names()})


def icm_interventions(registry: LayerRegistry, batch: int, steps: int, names: list[str]
                      ) -> list[AddVector]:
    """ICM-shaped interventions: per-sample, per-step vectors on `names` from 30% of the steps."""
    g = torch.Generator().manual_seed(0)
    start = step_window(0.3, None, steps).start
    return [AddVector(name, 15 * torch.randn(batch, steps, registry[name].width, generator=g),
                      start=start) for name in names]


def bench_steer(args: argparse.Namespace, overrides: list[str]) -> None:
    """ICM steering (per-sample, per-step vectors on the paper's three attn1 layers, from 30% of
    the steps on) against the plain pipeline."""
    paper = list(compose_config(["layers=paper_sd15"]).layers.select)
    _hook_benchmark(args, overrides, "steer", lambda registry, args: {
        "interventions": icm_interventions(registry, args.batch, args.steps, paper)})


def planted_activations(n: int, steps: int, widths: list[int], seed: int = 0):
    """Synthetic activations shaped like a store: per layer float16 [n, steps, width], with a
    step-correlated background and a label-dependent shift along one planted direction whose
    strength differs per layer and grows along the trajectory."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()[:, None]
    layers = []
    for width in widths:
        direction = torch.nn.functional.normalize(torch.randn(width, generator=g), dim=0)
        strength = 1.5 * torch.rand(1, generator=g).item()
        base = torch.randn(n, width, generator=g) * (0.5 + 2 * torch.rand(width, generator=g))
        out = torch.empty(n, steps, width, dtype=torch.float16)
        for s in range(steps):
            base = 0.95 * base + 0.31 * torch.randn(n, width, generator=g)
            out[:, s] = base + strength * (0.2 + s / steps) * sign * direction
        layers.append(out)
    return layers, y


def machine() -> str:
    """What the other processes on the machine are doing, and the thread pools of this one."""
    pools = {}
    for pool in threadpoolctl.threadpool_info():
        pools[pool["internal_api"]] = pool["num_threads"]
    one, five, _ = os.getloadavg()
    return (f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores; torch "
            f"{torch.get_num_threads()} threads; pools {pools}")


def sklearn_layer(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray
                  ) -> tuple[np.ndarray, float]:
    """One layer's probes (`x: [steps, n, width]`) fitted by scikit-learn as a careful user runs
    it in a worker: one BLAS/OpenMP thread. Balanced accuracies and the CPU seconds spent."""
    with single_threaded(), threadpoolctl.threadpool_limits(1):
        start = time.process_time()
        with warnings.catch_warnings():  # joblib hands workers read-only maps; only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            probes, labels = torch.from_numpy(x), torch.from_numpy(y)
        fit = fit_probes("sklearn", probes[:, train], labels[train], 2)
        balanced = scores(fit.logits(probes[:, test]), labels[test], 2)["balanced_accuracy"]
        return balanced.numpy(), time.process_time() - start


def sd15_probe_problem(n: int, steps: int
                       ) -> tuple[list[LayerInfo], list[torch.Tensor], torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """The probe benchmark's problem: planted activations of SD1.5's attn1 and attn2 layers
    (widths read from its architecture, in its order), labels, and an 80/20 split: (layers,
    activations [n, steps, width] per layer, y, train rows, test rows)."""
    registry, _ = build(compose_config(["model=sd15_random"]).model,
                        "model").registry_without_weights()
    infos = [layer for layer in registry if layer.kind in ("attn1", "attn2")]
    layers, y = planted_activations(n, steps, [layer.width for layer in infos])
    train = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(0.8 * n)]
    test = torch.tensor(sorted(set(range(n)) - set(train.tolist())))
    return infos, layers, y, train, test


def start_workers(jobs: int, x: np.ndarray, y: np.ndarray) -> None:
    """Start joblib's worker processes (each imports torch) before anything is timed."""
    warm = (x[:1, :64], y[:64], np.arange(48), np.arange(48, 64))
    Parallel(n_jobs=jobs)(delayed(sklearn_layer)(*warm) for _ in range(jobs))


def bench_probes(args: argparse.Namespace, overrides: list[str]) -> None:
    """logreg (batched) against scikit-learn per probe, on SD1.5-shaped probes. scikit-learn
    runs as a careful user runs it: one BLAS thread per process, in one process and over joblib
    workers on every core; wall and CPU time of each side, with the machine's load."""
    n, steps = 1024, args.probe_steps
    infos, layers, y, train, test = sd15_probe_problem(n, steps)
    widths = [layer.width for layer in infos]
    arrays = [x.permute(1, 0, 2).contiguous().numpy() for x in layers]  # [steps, n, width]
    split = (y.numpy(), train.numpy(), test.numpy())
    competing = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                 for _ in range(args.load)]
    try:
        print(f"probes: {len(widths)} layers (SD1.5 widths) x {steps} steps = "
              f"{len(widths) * steps} probes, N={n}; {args.load} competing busy processes",
              flush=True)
        jobs = os.cpu_count() or 1
        start_workers(jobs, arrays[0], split[0])
        sides = {
            "sklearn, 1 process x 1 thread": lambda: [sklearn_layer(x, *split) for x in arrays],
            f"sklearn, joblib {jobs} workers x 1 thread": lambda: Parallel(n_jobs=jobs)(
                delayed(sklearn_layer)(x, *split) for x in arrays),
        }
        results = {}
        for name, fit_all in sides.items():
            print(f"  {name}: {machine()}", flush=True)
            wall, cpu = time.perf_counter(), time.process_time()
            out = fit_all()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            worker_cpu = sum(seconds for _, seconds in out)
            results[name] = (wall, np.concatenate([b for b, _ in out]))
            print(f"    wall {wall:.1f} s, CPU {max(cpu, worker_cpu):.1f} s", flush=True)
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            for tol in args.probe_tol:
                _race_logreg(layers, y, train, test, device, tol, results)
        # The cause of the slowdown on a shared machine: one OpenMP team over every chunk.
        _race_logreg(layers, y, train, test, "cpu", args.probe_tol[0], results, workers=1)
        _pass_cost(layers, train)
    finally:
        for process in competing:
            process.kill()
            process.wait()


def _race_logreg(layers: list[torch.Tensor], y: torch.Tensor, train: torch.Tensor,
                 test: torch.Tensor, device: str, tol: float,
                 references: dict[str, tuple[float, np.ndarray]], workers: int | None = None
                 ) -> None:
    """The batched solver on the same probes, against each scikit-learn side."""
    fit_probes("logreg", layers[0][:64, :2].permute(1, 0, 2).to(device), y[:64].to(device), 2)
    threads = (f"{workers or torch.get_num_threads()} worker threads x 1 torch thread"
               if workers != 1 else f"1 worker x {torch.get_num_threads()} torch threads")
    print(f"  logreg tol {tol:g} on {device}, {threads}: {machine()}", flush=True)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    balanced = []
    for x in layers:  # rows gathered in the store's layout, as localize does
        x = x.to(device)
        fit = fit_probes("logreg", x[train].transpose(0, 1), y[train].to(device), 2, tol=tol,
                         workers=workers)
        logits = fit.logits(x[test].transpose(0, 1))
        balanced.append(scores(logits, y[test].to(device), 2)["balanced_accuracy"].cpu())
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    balanced = torch.cat(balanced).numpy()
    print(f"    wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    for name, (seconds, reference) in references.items():
        delta = np.abs(balanced - reference)
        print(f"    against {name}: {seconds / wall:.2f}x; |delta balanced accuracy| mean "
              f"{delta.mean():.4f} (goal <= 0.01), max {delta.max():.3f} (goal <= 0.03)",
              flush=True)


def _pass_cost(layers: list[torch.Tensor], train: torch.Tensor) -> None:
    """What bounds logreg: the time of one iteration's two products (z @ theta, then z^T @ r)
    over every standardised chunk, with the solver's workers, against a plain copy of the data
    (memory bandwidth). A fit at k iterations costs at least k such passes."""
    def one_pass(x: torch.Tensor) -> None:
        for z, _, _ in standardised_chunks(x):
            theta = torch.ones(len(z), z.shape[2], 1)
            rmatvec(z, matvec(z, theta))

    data = [x.permute(1, 0, 2)[:, train] for x in layers]
    workers = torch.get_num_threads()
    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        wall = time.perf_counter()
        list(pool.map(one_pass, data))
        wall = time.perf_counter() - wall
    gigabytes = sum(x.numel() for x in data) * 4 / 1e9
    source, target = torch.ones(int(2e8) // 4), torch.zeros(int(2e8) // 4)  # pages touched
    copy = time.perf_counter()
    target.copy_(source)
    copy = time.perf_counter() - copy
    print(f"  one solver pass (standardise + z @ theta + z^T @ r, {workers} workers) over the "
          f"{gigabytes:.2f} GB of float32 training probes: {wall:.2f} s; a plain 0.2 GB copy "
          f"runs at {0.4 / copy:.1f} GB/s (read + write)", flush=True)


def bench_solvers(args: argparse.Namespace, overrides: list[str]) -> None:
    """Could another first-order method fit in fewer passes? Iterations per probe (each costs
    two passes over the data for every method here) of logreg's conjugate gradients against
    SESOP (Narkiss & Zibulevsky 2005): at every iteration the exact minimum over the span of
    the gradient and the last `m` steps, found by Newton's method in that small subspace.
    SESOP-1 contains conjugate gradients' step; a larger m can only do better per iteration."""
    widths, steps = [320, 640, 1280], 10
    layers, y = planted_activations(1024, steps, widths)
    train = torch.randperm(1024, generator=torch.Generator().manual_seed(1))[:819]
    t = targets(y[train], 2)
    probes = [z.clone() for x in layers for z, _, _ in
              standardised_chunks(x[train].transpose(0, 1), chunk_mb=1e-9)]  # one per chunk
    print(f"solvers: {len(probes)} SD1.5-shaped probes (widths {widths}, {steps} steps each), "
          f"N={len(train)}, C=1; mean (max) iterations to max |gradient| < tol", flush=True)
    for tol in (1e-3, 1e-4):
        counts = {"logreg (conjugate gradients)":
                  [int(fit_logreg_chunk(z, t, 1.0, 500, tol)[2].max()) for z in probes]}
        for m in (1, 8):
            counts[f"SESOP-{m}"] = [_sesop_iterations(z, t, 1.0, tol, m) for z in probes]
        for name, count in counts.items():
            print(f"  tol {tol:g}, {name}: {np.mean(count):.1f} ({max(count)})", flush=True)


def _sesop_iterations(z: torch.Tensor, t: torch.Tensor, C: float, tol: float, m: int,
                      max_iter: int = 500) -> int:
    """Iterations of SESOP-m on one standardised probe `z: [1, n, W]` (float64 subspace)."""
    n, W = z.shape[1:]
    penalty = torch.full((W + 1, 1), 1 / (C * n), dtype=torch.float64)
    penalty[W] = 0
    theta, margin = z.new_zeros(1, W + 1, 1), z.new_zeros(1, n, 1)
    steps: list[torch.Tensor] = []
    z_steps: list[torch.Tensor] = []
    for iteration in range(max_iter):
        grad = torch.cat([rmatvec(z, torch.sigmoid(margin) - t),
                          (torch.sigmoid(margin) - t).sum(1, keepdim=True)], 1) / n
        grad = grad + theta * penalty.float()
        if grad.abs().max() < tol:
            return iteration
        z_grad = matvec(z, grad[:, :W]) + grad[:, W:]
        basis = torch.cat([grad, *steps], dim=2)[0].double()  # [W + 1, k]
        z_basis = torch.cat([z_grad, *z_steps], dim=2)[0].double()  # [n, k]
        gram = basis.T @ (penalty * basis)
        offset = basis.T @ (penalty * theta[0].double())
        alpha = torch.zeros(basis.shape[1], 1, dtype=torch.float64)
        for _ in range(8):  # Newton in the subspace; the objective is smooth and convex
            p = torch.sigmoid(margin[0].double() + z_basis @ alpha)
            g = z_basis.T @ (p - t.double()) / n + offset + gram @ alpha
            hessian = z_basis.T @ (p * (1 - p) * z_basis) / n + gram
            alpha = alpha - torch.linalg.lstsq(hessian, g).solution
        step, z_step = (basis @ alpha).float()[None], (z_basis @ alpha).float()[None]
        theta, margin = theta + step, margin + z_step
        steps, z_steps = [step, *steps][:m], [z_step, *z_steps][:m]
    return max_iter


def bench_sweep(args: argparse.Namespace, overrides: list[str]) -> None:
    """Denoiser calls of a 4 alpha x 3 layer-set sweep at start 0.3 on the toy model, against
    the naive count (every configuration generating its base and steered images whole)."""
    with tempfile.TemporaryDirectory() as root:
        common = [f"paths.root={root}", "model=toy", *overrides]
        run(compose_config([*common, "stages=[collect,localize]"]), Path(root) / "localize")
        calls, configs = [], [(a, k) for k in (1, 3, 5) for a in (5, 10, 15, 30)]
        for alpha, k in configs:
            out = Path(root) / f"alpha{alpha}-k{k}"
            run(compose_config([*common, "stages=[steer,evaluate]", f"steer.alpha={alpha}",
                                f"layers.k={k}"]), out)
            calls.append(json.loads((out / "metrics.json").read_text())["denoiser_calls"])
        cfg = compose_config(common)
        batches = -(-cfg.eval.n_images_per_prompt * len(cfg.concept.eval_prompts)
                    // cfg.model.batch_size)
    whole = batches * cfg.model.steps  # one image set generated from its first step
    start = step_window(cfg.steer.start, cfg.steer.end, cfg.model.steps).start
    steer_calls = sum(c["steer"] for c in calls)
    steered = steer_calls - whole  # the first configuration also made the base images
    goal = (start / cfg.model.steps) + len(configs) * (1 - start / cfg.model.steps)
    print(f"sweep: toy, {len(configs)} configurations (alpha 5/10/15/30 x layers.k 1/3/5), "
          f"start {cfg.steer.start} (step {start} of {cfg.model.steps}), {batches} batches per "
          f"image set\n  denoiser calls in steer: {steer_calls} = base 1 + "
          f"steered {steered / whole:.2f} image-set equivalents (goal <= {goal:.2f}); naive "
          f"{2 * len(configs) * whole} ({2 * len(configs)} equivalents), with the base images "
          f"shared {(len(configs) + 1) * whole}: {steer_calls / (2 * len(configs) * whole):.2f} "
          "of naive", flush=True)


def bench_store(args: argparse.Namespace, overrides: list[str]) -> None:
    """Bytes written and read by the default toy collect, per byte of the store it makes."""
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as root:  # a real disk: tmpfs counts none
        cfg = compose_config([f"paths.root={root}", "model=toy", "stages=[collect]", *overrides])
        io = io_per_byte_stored(lambda: run(cfg, Path(root) / "run")["collect"])
    print(f"store: toy collect, {cfg.collect.n_images} images, {io['stored_bytes'] / 1e6:.1f} MB "
          f"stored\n  per byte stored, by the store: written {io['store_writes']:.3f} (goal <= "
          f"1.05), read from disk {io['store_reads']:.3f} (goal: none until localize reads each "
          f"byte once); by the whole collect (images, logs, weights): written "
          f"{io['write_bytes']:.3f}, read {io['read_bytes']:.3f}", flush=True)


SPIN_PROBE = """
import sys, time
from icm_lab.config.compose import compose_config
from icm_lab.engine.generation import Generator
from icm_lab.models.adapters import layer_registry
from icm_lab.stages.components import build
spec = build(compose_config(["model=toy"]).model, "model")
pipe = spec.load()
generator = Generator(pipe, layer_registry(pipe, spec.resolution), spec)
generator.all(["a circle"] * 8, list(range(8)))  # warm-up
start = time.perf_counter()
generator.all(["a circle"] * 64, list(range(64)))
print(time.perf_counter() - start)
"""


def bench_openmp(args: argparse.Namespace, overrides: list[str]) -> None:
    """Toy generation (64 images) with GNU OpenMP's default spin count against the one
    `icm_lab/__init__.py` sets, idle and beside `--load` busy processes. Each side is a fresh
    process: the spin count is read when torch loads OpenMP."""
    for load in sorted({0, args.load or 3}):
        competing = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(load)]
        try:
            seconds = {}
            for spin in ("300000", "30000"):  # libgomp's default, then icm_lab's
                env = {**os.environ, "GOMP_SPINCOUNT": spin}
                out = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, text=True,
                                     capture_output=True, check=True).stdout
                seconds[spin] = float(out.split()[-1])
            print(f"openmp: toy, 64 images, {load} busy processes, {machine()}\n  "
                  f"GOMP_SPINCOUNT 300000 (default) {seconds['300000']:.2f} s, 30000 "
                  f"(icm_lab) {seconds['30000']:.2f} s: "
                  f"{seconds['300000'] / seconds['30000']:.2f}x", flush=True)
        finally:
            for process in competing:
                process.kill()
                process.wait()


def _report(name: str, setting: str, base: float, variant: float, base_median: float,
            variant_median: float, target: float) -> None:
    overhead = variant / base - 1
    verdict = "ok" if overhead <= target else "ABOVE TARGET"
    print(f"{name}: {setting}\n  min plain {base * 1e3:.1f} ms, hooked {variant * 1e3:.1f} ms: "
          f"ratio {variant / base:.3f}, overhead {overhead:+.1%} (target <= {target:.0%}: "
          f"{verdict}); medians {base_median * 1e3:.1f} / {variant_median * 1e3:.1f} ms: ratio "
          f"{variant_median / base_median:.3f}", flush=True)


BENCHMARKS = {"record": bench_record, "steer": bench_steer, "probes": bench_probes,
              "solvers": bench_solvers, "sweep": bench_sweep, "store": bench_store,
              "openmp": bench_openmp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--model", default="tiny_sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--probe-steps", type=int, default=50)
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes competing with the probe benchmark (a shared box)")
    parser.add_argument("--probe-tol", type=float, nargs="+",
                        default=[OmegaConf.load(CONFIG_DIR / "probe/logreg.yaml").tol],
                        help="logreg gradient tolerances to race (default: conf/probe/logreg)")
    args, overrides = parser.parse_known_args()
    torch.set_grad_enabled(False)
    for name in args.only or BENCHMARKS:
        BENCHMARKS[name](args, overrides)


def io_per_byte_stored(make_store: Callable[[], ActivationStore]) -> dict[str, float]:
    """This process's I/O while `make_store()` runs (e.g. a fresh collect), per byte of the
    store it returns (its `store/` folder; `stored_bytes`), from Linux's /proc/self/io:
    `write_bytes` and `read_bytes` count what reached the storage layer (memory-mapped writes
    included, in whole pages, when they are dirtied; nothing on tmpfs; page-cache hits are not
    reads), `wchar` and `rchar` only bytes passed to write and read calls. `store_writes` and
    `store_reads` are the parts spent inside `StoreWriter` (arrays, markers, finalize): about
    1.0 and 0.0, since collect writes each activation byte once and reads none back; the rest
    is the images, logs and model weights."""
    spent = {"write_bytes": 0, "read_bytes": 0}

    def counted(method: Callable) -> Callable:
        @functools.wraps(method)
        def measured(*args: object, **kwargs: object) -> object:
            start = _io_counters()
            try:
                return method(*args, **kwargs)
            finally:
                end = _io_counters()
                for key in spent:
                    spent[key] += end[key] - start[key]
        return measured

    originals = {name: getattr(StoreWriter, name) for name in ("__init__", "write_batch",
                                                                "finalize")}
    for name, method in originals.items():
        setattr(StoreWriter, name, counted(method))
    before = _io_counters()
    try:
        store = make_store()
    finally:
        for name, method in originals.items():
            setattr(StoreWriter, name, method)
    after = _io_counters()
    stored = sum(path.stat().st_size for path in (store.root / "store").iterdir())
    delta = {key: (after[key] - before[key]) / stored
             for key in ("write_bytes", "read_bytes", "wchar", "rchar")}
    return {"stored_bytes": stored, **delta, "store_writes": spent["write_bytes"] / stored,
            "store_reads": spent["read_bytes"] / stored}


def _io_counters() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().splitlines()
    return {key: int(value) for key, value in (line.split(": ") for line in lines)}


if __name__ == "__main__":
    main()
