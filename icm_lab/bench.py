"""Performance figures, measured side by side in one run (`make bench`).

Each benchmark times a baseline and a variant on the same inputs, interleaving repetitions so
that drifts in machine load hit both alike, and reports the ratio of the medians.

    python -m icm_lab.bench [--model tiny_sd15] [--steps 20] [--batch 8] [--reps 15] [overrides...]

On a GPU: python -m icm_lab.bench --model sd15_random model.device=cuda model.dtype=float16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from icm_lab.config import CONFIG_DIR, compose_config
from icm_lab.hooks import DenoiserHooks
from icm_lab.models.adapters import layer_registry
from icm_lab.validation import build

TARGETS = {"record": {"cpu": 0.10, "cuda": 0.05}, "steer": {"cpu": 0.03, "cuda": 0.02}}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pair(baseline: Callable[[], object], variant: Callable[[], object], reps: int):
    """Seconds per call of each, interleaved after one warm-up call of each: the minimums (the
    least noisy estimate of the intrinsic cost on a shared machine) and the medians."""
    baseline(), variant()
    times: dict[str, list[float]] = {"baseline": [], "variant": []}
    for _ in range(reps):
        for name, fn in (("baseline", baseline), ("variant", variant)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return (min(times["baseline"]), min(times["variant"]),
            statistics.median(times["baseline"]), statistics.median(times["variant"]))


class HookTimer:
    """Times every forward (pre-)hook registered while active: the engine's own cost, free of
    the machine-load noise that blurs whole-generation ratios on a shared CPU."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._originals = {}

    def _wrap(self, register):
        def patched(module, hook, *args, **kwargs):
            def timed(*hook_args, **hook_kwargs):
                start = time.perf_counter()
                try:
                    return hook(*hook_args, **hook_kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

            return register(module, timed, *args, **kwargs)

        return patched

    def __enter__(self) -> HookTimer:
        for name in ("register_forward_hook", "register_forward_pre_hook"):
            self._originals[name] = getattr(torch.nn.Module, name)
            setattr(torch.nn.Module, name, self._wrap(self._originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.nn.Module, name, original)


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


def bench_steer(args: argparse.Namespace, overrides: list[str]) -> None:
    """ICM steering (per-sample, per-step vectors on the paper's three attn1 layers, from 30% of
    the steps on) against the plain pipeline."""
    from icm_lab.hooks import AddVector

    def steering(registry, args):
        g = torch.Generator().manual_seed(0)
        layers = [registry[name] for name in compose_config(["layers=paper_sd15"]).layers.select]
        start = int(0.3 * args.steps)
        return {"interventions": [
            AddVector(layer.name, 15 * torch.randn(args.batch, args.steps, layer.width,
                                                   generator=g), start=start)
            for layer in layers]}

    _hook_benchmark(args, overrides, "steer", steering)


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


def bench_probes(args: argparse.Namespace, overrides: list[str]) -> None:
    """logreg (batched) against the sklearn per-probe loop, on SD1.5-shaped probes."""
    from icm_lab.probes import fit_probes, scores

    n, steps = 1024, args.probe_steps
    registry, _ = build(compose_config(["model=sd15_random"]).model,
                        "model").registry_without_weights()
    widths = [layer.width for kind in ("attn1", "attn2") for layer in registry
              if layer.kind == kind]  # SD1.5's, read from its architecture
    layers, y = planted_activations(n, steps, widths)
    train = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(0.8 * n)]
    test = torch.tensor(sorted(set(range(n)) - set(train.tolist())))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def run(backend: str, device: str, tol: float | None = None) -> tuple[float, torch.Tensor]:
        _sync()
        start = time.perf_counter()
        balanced = []
        for x in layers:
            probes = x.to(device).permute(1, 0, 2)  # [steps, n, width]
            options = {"tol": tol} if backend == "logreg" else {}
            fit = fit_probes(backend, probes[:, train], y[train].to(device), 2, **options)
            logits = fit.logits(probes[:, test])
            balanced.append(scores(logits, y[test].to(device), 2)["balanced_accuracy"].cpu())
        _sync()
        return time.perf_counter() - start, torch.cat(balanced)

    for device in devices:  # warm-up: first calls pay for library initialisation
        fit_probes("logreg", layers[0][:64, :2].permute(1, 0, 2).to(device),
                   y[:64].to(device), 2)
    seconds, reference = run("sklearn", "cpu")
    print(f"probes: {len(widths)} layers (SD1.5 widths) x {steps} steps, N={n}\n"
          f"  sklearn per-probe loop {seconds:.1f} s", flush=True)
    for tol in args.probe_tol:
        for device in devices:
            ours, balanced = run("logreg", device, tol)
            delta = (balanced - reference).abs()
            speedup = seconds / ours
            print(f"  logreg tol {tol:g} on {device}: {ours:.2f} s, {speedup:.1f}x faster "
                  f"(target >= 30x: {'ok' if speedup >= 30 else 'BELOW TARGET'}), mean |delta "
                  f"balanced accuracy| {delta.mean():.4f} (target <= 0.02: "
                  f"{'ok' if delta.mean() <= 0.02 else 'ABOVE'}), max {delta.max():.3f}",
                  flush=True)


def _report(name: str, setting: str, base: float, variant: float, base_median: float,
            variant_median: float, target: float) -> None:
    overhead = variant / base - 1
    verdict = "ok" if overhead <= target else "ABOVE TARGET"
    print(f"{name}: {setting}\n  min plain {base * 1e3:.1f} ms, hooked {variant * 1e3:.1f} ms: "
          f"ratio {variant / base:.3f}, overhead {overhead:+.1%} (target <= {target:.0%}: "
          f"{verdict}); medians {base_median * 1e3:.1f} / {variant_median * 1e3:.1f} ms: ratio "
          f"{variant_median / base_median:.3f}", flush=True)


BENCHMARKS = {"record": bench_record, "steer": bench_steer, "probes": bench_probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--model", default="tiny_sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--probe-steps", type=int, default=50)
    parser.add_argument("--probe-tol", type=float, nargs="+",
                        default=[OmegaConf.load(CONFIG_DIR / "probe/logreg.yaml").tol],
                        help="logreg gradient tolerances to race (default: conf/probe/logreg)")
    args, overrides = parser.parse_known_args()
    torch.set_grad_enabled(False)
    for name in args.only or BENCHMARKS:
        BENCHMARKS[name](args, overrides)


if __name__ == "__main__":
    main()
