"""Replay a steering plan: regenerate a run's steered images from `<run>/steer/plan.json`.

    python -m icm_lab replay outputs/runs/.../steer/plan.json [--out DIR]

The plan holds the model settings, prompts, seeds, targets, strength, step window and directions,
so the images come out bit for bit the same on the same device and library versions. They are
written to `--out` (default: `replay/` beside the plan) and compared with the run's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from icm_lab.engine.generation import Generator
from icm_lab.io.files import write_image
from icm_lab.models.adapters import layer_registry
from icm_lab.models.loading import ModelSpec
from icm_lab.steering.plans import SteerPlan


def regenerate(plan: SteerPlan) -> list[Image.Image]:
    spec = ModelSpec(**plan.model)
    pipeline = spec.load()
    generator = Generator(pipeline, layer_registry(pipeline, spec.resolution), spec)
    return generator.all(plan.prompts, plan.seeds, plan.interventions(), desc="replay")


def replay(argv: list[str]) -> int:
    """Exit status: 0 if every image matches the run's (or the run kept none), else 1."""
    parser = argparse.ArgumentParser(prog="python -m icm_lab replay", description=__doc__)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    plan = SteerPlan.load(args.plan)
    out = args.out or args.plan.parent / "replay"
    out.mkdir(parents=True, exist_ok=True)
    images = regenerate(plan)
    originals = args.plan.parent / "images"
    same = 0
    for index, image in enumerate(images):
        write_image(image, out / f"{index:06d}.png")
        original = originals / f"{index:06d}.png"
        same += original.exists() and np.array_equal(np.asarray(image),
                                                      np.asarray(Image.open(original)))
    if not originals.is_dir():  # method=none keeps no steered images of its own
        print(f"replay: {len(images)} images in {out}; the run kept none to compare with")
        return 0
    print(f"replay: {len(images)} images in {out}; {same} of them identical to {originals}")
    return 0 if same == len(images) else 1
