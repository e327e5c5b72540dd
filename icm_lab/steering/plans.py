"""Steering plans: which sample goes to which class, and the interventions that take it there.

A `SteerPlan` is the whole of a steered generation as data: the model, prompts, seeds, per-sample
targets, strength, step window and, per layer, the unit directions and their scale (by reference
into a safetensors file). `<run>/steer/plan.json` + `plan.safetensors` hold it, and
`python -m icm_lab replay <run>/steer/plan.json` regenerates the run's steered images from it.

The vector added at a layer and step for class k is alpha * scale[step, k] * direction[step, k]:
`steer.units=raw` makes the scale 1 (the paper's alpha), `sigma` the spread of the collected
activations along that direction (`ProbeSet.sigmas`), so that one alpha is the same push at any
layer (`calibrated_edit`).

Target assignment is exact, not random per batch: within each prompt the counts of every class
match the target distribution by the largest-remainder rule, and which sample gets which target
is a seeded shuffle. The `minimal` policy looks at the unsteered (base) labels first and steers
only the samples needed to reach those counts, leaving the rest untouched. The `paper_batch`
policy is the paper's protocol instead: one class drawn at random (seeded, from the target
distribution) for each batch of `PAPER_BATCH` consecutive samples, so counts vary by chance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from icm_lab.config.schema import Policy, Units
from icm_lab.core.errors import UserError, choices_error
from icm_lab.engine.hooks import AddVector
from icm_lab.io.files import atomic, write_json

if TYPE_CHECKING:
    from icm_lab.probing.probeset import ProbeSet

UNTOUCHED = -1
PAPER_BATCH = 16  # the paper generated and steered 16 images per batch, one class per batch


def largest_remainder(n: int, target: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, as close to n * target as possible."""
    exact = n * np.asarray(target, dtype=float)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")  # ties: the earlier class
    counts[order[: n - counts.sum()]] += 1
    return counts


def assign_targets(n: int, target: np.ndarray, seed: int, policy: str = "all",
                   base: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the class index to steer towards, or UNTOUCHED.

    `all`: every sample is steered; class counts follow the target exactly. `minimal`: `base`
    holds each sample's unsteered class (-1: undecided); samples of a class are kept untouched up
    to that class's count, and only the others are steered to the classes still short.
    `paper_batch`: every sample is steered, each run of PAPER_BATCH samples to one class drawn
    from `target`.
    """
    if policy not in set(Policy):
        raise choices_error("steer.policy", policy, [p.value for p in Policy])
    if policy == "paper_batch":
        return paper_batch_targets(n, target, seed)
    counts = largest_remainder(n, target)
    rng = np.random.default_rng(seed)
    if policy == "all":
        return rng.permutation(np.repeat(np.arange(len(counts)), counts))
    if base is None or len(base) != n:
        raise ValueError("the minimal policy needs the base label of every sample")
    targets = np.full(n, UNTOUCHED)
    pool = []
    for k, count in enumerate(counts):
        members = rng.permutation(np.flatnonzero(base == k))
        pool.extend(members[count:])  # surplus of class k must move
        counts[k] -= min(count, len(members))
    pool.extend(np.flatnonzero(~np.isin(base, np.arange(len(counts)))))  # undecided
    pool = rng.permutation(np.array(pool, dtype=int))
    targets[pool] = np.repeat(np.arange(len(counts)), counts)
    return targets


def paper_batch_targets(n: int, target: np.ndarray, seed: int,
                        batch: int = PAPER_BATCH) -> np.ndarray:
    """One class per batch of `batch` consecutive samples, drawn independently from `target`."""
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(target), size=-(-n // batch), p=np.asarray(target, dtype=float))
    return np.repeat(drawn, batch)[:n]


@dataclass
class LayerEdit:
    """Unit directions `[steps, classes, width]` added to one layer's output, each times alpha
    and its `scale` `[steps, classes]` (None: 1, alpha in raw units)."""

    layer: str
    directions: torch.Tensor
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale is None:
            self.scale = torch.ones(self.directions.shape[:2])

    def vectors(self, alpha: float) -> torch.Tensor:
        """`[steps, classes, width]`: what is added for each class at each step."""
        return self.directions * (alpha * self.scale)[..., None]


def calibrated_scale(probes: ProbeSet, layer: str, source: str, units: str) -> torch.Tensor:
    """`[steps, classes]`, what alpha is multiplied by at `layer` along the `source` directions:
    1 (`raw`) or their sigma (`sigma`: alpha counts standard deviations of the collected
    activations along the direction)."""
    if units not in set(Units):
        raise choices_error("steer.units", units, [u.value for u in Units])
    if units == "raw":  # no sigma read: probe sets from before sigma still steer in raw units
        return torch.ones(probes.directions(layer, source).shape[:2])
    return probes.sigmas(layer, source)


def calibrated_edit(probes: ProbeSet, layer: str, source: str, units: str) -> LayerEdit:
    """One layer's probe directions (`probe` or `mean_diff`) with their scale in `units`: the
    edit of every method that steers along probe directions, one layer alone or several."""
    return LayerEdit(layer, probes.directions(layer, source),
                     calibrated_scale(probes, layer, source, units))


@dataclass
class SteerPlan:
    method: str
    alpha: float | None  # None: the method adds no vector (prompt, none)
    start: int | None  # first steered step
    end: int | None  # one past the last steered step
    halves: str
    renorm: bool
    direction: str | None  # where the directions come from: probe, mean_diff, random
    probe_set: str | None  # fingerprint of the probe set the directions were read from
    classes: list[str]
    prompts: list[str]  # what each sample is generated from (after the method's prompt edit)
    seeds: list[int]
    targets: list[int]  # class index per sample, UNTOUCHED (-1) for samples left alone
    model: dict[str, Any]  # the ModelSpec fields the images were generated with
    units: str | None = None  # raw or sigma (see LayerEdit.scale); None: no vector added
    edits: list[LayerEdit] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return [edit.layer for edit in self.edits]

    def interventions(self) -> list[AddVector]:
        """One AddVector per layer: alpha times the scaled direction of each sample's target
        class at each step, zero for untouched samples (which then stay bit-identical to their
        base)."""
        targets = torch.as_tensor(self.targets)
        steered = targets != UNTOUCHED
        classes = torch.where(steered, targets, 0)
        result = []
        for edit in self.edits:
            vectors = edit.vectors(self.alpha)[:, classes].transpose(0, 1)  # [B, S, W]
            vectors[~steered] = 0
            result.append(AddVector(edit.layer, vectors.float(), start=self.start, end=self.end,
                                    halves=self.halves, renorm=self.renorm))
        return result

    def save(self, directory: Path) -> Path:
        """`plan.json` (directions and scales by key into `plan.safetensors`), written last."""
        directory.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "edits"}
        data["edits"] = [{"layer": e.layer, "directions": f"{i}/directions", "scale": f"{i}/scale"}
                         for i, e in enumerate(self.edits)]
        tensors = {f"{i}/{name}": getattr(e, name).detach().float().contiguous()
                   for i, e in enumerate(self.edits) for name in ("directions", "scale")}
        with atomic(directory / "plan.safetensors") as tmp:
            save_file(tensors, tmp)
        write_json(directory / "plan.json", data)
        return directory / "plan.json"

    @classmethod
    def load(cls, path: Path) -> SteerPlan:
        path = Path(path)
        if not path.is_file() or not (path.parent / "plan.safetensors").is_file():
            raise UserError(f"no steering plan at {path} (with plan.safetensors beside it); "
                            "pass <run>/steer/plan.json of a run that steered")
        data = json.loads(path.read_text())
        tensors = load_file(path.parent / "plan.safetensors")
        edits = [LayerEdit(e["layer"], tensors[e["directions"]], tensors.get(e.get("scale")))
                 for e in data.pop("edits")]  # a plan older than units: no scale, raw alpha
        return cls(**data, edits=edits)
