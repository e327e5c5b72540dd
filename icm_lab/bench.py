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


def _report(name: str, setting: str, base: float, variant: float, target: float) -> None:
    overhead = variant / base - 1
    verdict = "ok" if overhead <= target else "ABOVE TARGET"
    print(f"{name}: {setting}\n  plain {base * 1e3:.1f} ms, hooked {variant * 1e3:.1f} ms, "
          f"ratio {variant / base:.3f}, overhead {overhead:+.1%} "
          f"(target <= {target:.0%}: {verdict})", flush=True)


BENCHMARKS = {"record": bench_record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--model", default="tiny_sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    args, overrides = parser.parse_known_args()
    torch.set_grad_enabled(False)
    for name in args.only or BENCHMARKS:
        BENCHMARKS[name](args, overrides)


if __name__ == "__main__":
    main()
