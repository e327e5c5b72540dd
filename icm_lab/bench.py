"""Performance figures, measured side by side in one run (`make bench`).

Each benchmark times a baseline and a variant on the same inputs, interleaving repetitions so
that drifts in machine load hit both alike, and reports the ratio of the medians.

    python -m icm_lab.bench [--model tiny_sd15] [--steps 20] [--batch 8] [--reps 7] [overrides...]

On a GPU: python -m icm_lab.bench --model sd15_random model.device=cuda model.dtype=float16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from icm_lab.config import compose_config
from icm_lab.hooks import DenoiserHooks
from icm_lab.models.layers import layer_registry
from icm_lab.models.loading import load_pipeline, pipeline_call_kwargs

TARGETS = {"record": {"cpu": 0.10, "cuda": 0.05}}
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pair(baseline: Callable[[], object], variant: Callable[[], object], reps: int):
    """Median seconds of each, interleaved, after one warm-up call of each."""
    baseline(), variant()
    times: dict[str, list[float]] = {"baseline": [], "variant": []}
    for _ in range(reps):
        for name, fn in (("baseline", baseline), ("variant", variant)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["baseline"]), statistics.median(times["variant"])


def bench_record(args: argparse.Namespace, overrides: list[str]) -> None:
    """Recording every attn1, attn2 and bottleneck layer against the plain pipeline."""
    cfg = compose_config([f"model={args.model}", *overrides]).model
    pipe = load_pipeline(cfg)
    registry = layer_registry(pipe, cfg.resolution)
    kwargs = pipeline_call_kwargs(cfg) | {"num_inference_steps": args.steps}
    prompts = ["a photo of a person"] * args.batch

    def generate():
        generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        return pipe(prompts, generator=generators, output_type="latent", **kwargs)

    def generate_recording():
        with DenoiserHooks(pipe, registry, record=registry.names()) as hooks:
            generate()
        return hooks.recording()

    base, hooked = time_pair(generate, generate_recording, args.reps)
    device = pipe.device.type
    setting = (f"{cfg.name}, {len(registry)} layers, {args.steps} steps, batch {args.batch}, "
               f"{cfg.resolution}px, {device}/{str(pipe.dtype).removeprefix('torch.')}")
    _report("record", setting, base, hooked, TARGETS["record"].get(device, 0.10))


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
    widths = SD15_WIDTHS * 2  # attn1 and attn2
    layers, y = planted_activations(n, steps, widths)
    train = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(0.8 * n)]
    test = torch.tensor(sorted(set(range(n)) - set(train.tolist())))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def run(backend: str, device: str) -> tuple[float, torch.Tensor]:
        _sync()
        start = time.perf_counter()
        balanced = []
        for x in layers:
            probes = x.to(device).permute(1, 0, 2)  # [steps, n, width]
            fit = fit_probes(backend, probes[:, train], y[train].to(device), 2)
            logits = fit.logits(probes[:, test].float())
            balanced.append(scores(logits, y[test].to(device), 2)["balanced_accuracy"].cpu())
        _sync()
        return time.perf_counter() - start, torch.cat(balanced)

    for device in devices:  # warm-up: first calls pay for library initialisation
        fit_probes("logreg", layers[0][:64, :2].permute(1, 0, 2).to(device),
                   y[:64].to(device), 2)
    seconds, reference = run("sklearn", "cpu")
    setting = f"{len(widths)} layers (SD1.5 widths) x {steps} steps, N={n}"
    print(f"probes: {setting}\n  sklearn per-probe loop {seconds:.1f} s", flush=True)
    for device in devices:
        ours, balanced = run("logreg", device)
        delta = (balanced - reference).abs()
        speedup = seconds / ours
        print(f"  logreg on {device}: {ours:.2f} s, {speedup:.1f}x faster (target >= 30x: "
              f"{'ok' if speedup >= 30 else 'BELOW TARGET'}), mean |delta balanced accuracy| "
              f"{delta.mean():.4f} (target <= 0.02: {'ok' if delta.mean() <= 0.02 else 'ABOVE'}),"
              f" max {delta.max():.3f}", flush=True)


def _report(name: str, setting: str, base: float, variant: float, target: float) -> None:
    overhead = variant / base - 1
    verdict = "ok" if overhead <= target else "ABOVE TARGET"
    print(f"{name}: {setting}\n  plain {base * 1e3:.1f} ms, hooked {variant * 1e3:.1f} ms, "
          f"ratio {variant / base:.3f}, overhead {overhead:+.1%} "
          f"(target <= {target:.0%}: {verdict})", flush=True)


BENCHMARKS = {"record": bench_record, "probes": bench_probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--model", default="tiny_sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--probe-steps", type=int, default=50)
    args, overrides = parser.parse_known_args()
    torch.set_grad_enabled(False)
    for name in args.only or BENCHMARKS:
        BENCHMARKS[name](args, overrides)


if __name__ == "__main__":
    main()
