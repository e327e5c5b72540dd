"""The toy model's quality bars, measured by generating and reading images with the oracle.

    python -m icm_lab.tools.toy_quality [--per-prompt 64] [--out outputs/toy_quality.json]
        [overrides]

- explicit: "a red circle", "a small square", ...: the share of images showing the named colour
  (size) by the oracle. Bar: >= 95%.
- implicit: "a circle", ...: the generated colour (size) distribution per shape against the
  world's prior, as the largest gap in percentage points. Bar: within 10 points.
- clip agreement: the toy CLIP's zero-shot labels (the run's labeler) against the oracle on every
  generated image. Bar: >= 90%.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from icm_lab.config.compose import compose_config
from icm_lab.core.concepts import Concept
from icm_lab.io.files import write_json
from icm_lab.labeling.labelers import ClipLabeler
from icm_lab.stages.resources import Resources
from icm_lab.toy import world

BARS = {"explicit_accuracy": 0.95, "implicit_max_gap_points": 10.0, "clip_agreement": 0.90}
ATTRIBUTES = {"color": (world.COLORS, world.COLOR_PRIOR), "size": (world.SIZES, world.SIZE_PRIOR)}


def measure(res: Resources, per_prompt: int, seed: int = 0) -> dict:
    """Every bar for colour and size, from `per_prompt` images of each prompt."""
    report: dict = {}
    for attribute, (values, prior) in ATTRIBUTES.items():
        explicit = [(world.caption(shape, **{attribute: v}), v) for shape in world.SHAPES
                    for v in values]
        implicit = [(world.caption(shape), shape) for shape in world.SHAPES]
        prompts = [p for p, _ in explicit + implicit for _ in range(per_prompt)]
        seeds = [seed + i for i in range(len(prompts))]
        images = res.generator.all(prompts, seeds, desc=f"toy quality: {attribute}")
        read = np.array([getattr(world.oracle(image), attribute) for image in images])
        by_prompt = read.reshape(-1, per_prompt)

        named = np.array([v for _, v in explicit])[:, None]
        accuracy = float((by_prompt[:len(explicit)] == named).mean())
        shares = {shape: {v: float((row == v).mean()) for v in values}
                  for (_, shape), row in zip(implicit, by_prompt[len(explicit):], strict=True)}
        gap = max(abs(shares[s][v] - prior[s][v]) for s in shares for v in values) * 100

        cfg = compose_config([f"concept={attribute}"]).concept
        clip_labels = ClipLabeler(Concept.from_config(cfg), res.clip, 0.0)(images).labels
        agreement = float(np.mean([c == o for c, o in zip(clip_labels, read, strict=True)]))
        report[attribute] = {
            "explicit_accuracy": accuracy, "implicit_max_gap_points": gap,
            "clip_agreement": agreement, "implicit_shares": shares, "prior": prior,
            "n_images": len(images),
        }
    report["passed"] = all(_passes(report[a]) for a in ATTRIBUTES)
    return report


def _passes(values: dict) -> bool:
    return (values["explicit_accuracy"] >= BARS["explicit_accuracy"]
            and values["implicit_max_gap_points"] <= BARS["implicit_max_gap_points"]
            and values["clip_agreement"] >= BARS["clip_agreement"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-prompt", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_quality.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.guidance=3")
    args = parser.parse_args(argv)
    cfg = compose_config(["model=toy", *args.overrides])
    report = measure(Resources(cfg, args.out.parent), args.per_prompt)
    write_json(args.out, report)
    print(f"{'':8} {'explicit':>9} {'implicit gap':>13} {'clip agrees':>12}")
    for attribute in ATTRIBUTES:
        r = report[attribute]
        print(f"{attribute:8} {r['explicit_accuracy']:9.1%} {r['implicit_max_gap_points']:10.1f} pt"
              f" {r['clip_agreement']:12.1%}")
    print(f"bars: explicit >= 95%, implicit gap <= 10 points, clip agreement >= 90%: "
          f"{'PASSED' if report['passed'] else 'FAILED'} ({args.out})")


if __name__ == "__main__":
    main()
