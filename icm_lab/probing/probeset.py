"""Saved probes: weights, standardisation and steering directions per layer, with provenance.

    probes.safetensors   per layer L, all [steps, ...]:
                           L/mean [S, W], L/scale [S, W]        standardisation
                           L/weight [S, W, O], L/bias [S, O]   probe on standardised features
                           L/direction [S, K, W]               unit steering direction per class,
                                                               in raw activation space
                           L/direction_mean_diff [S, K, W]     the same from the difference of
                                                               class means, whatever the probe
                           L/sigma [S, K], L/sigma_mean_diff   the spread of the activations
                                                               along each direction
                                                               (`projection_std`): the unit of
                                                               `steer.units=sigma`
                         metadata `icm_lab`: provenance, classes, backend (JSON)
    scores.parquet/.csv  one row per (layer, step): balanced_accuracy, accuracy, auroc (means
                         over the folds), each with <score>_std, folds, ...
    meta.json            classes, backend, layers, steps
    manifest.json        every file's size and hash, written last: the artefact is complete
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from icm_lab.config.schema import Direction
from icm_lab.core.errors import UserError
from icm_lab.io.artefacts import Provenance, damage, is_sealed, read_json, seal
from icm_lab.io.files import atomic, write_json, write_table
from icm_lab.probing.probes import ProbeFit

if TYPE_CHECKING:
    from icm_lab.io.store import ActivationStore

SOURCES = tuple(d.value for d in Direction)  # where a direction comes from (steer.direction)


def projection_std(x: np.ndarray, directions: torch.Tensor) -> torch.Tensor:
    """`[S, K]`: over the N images of `x: [N, S, W]` (one layer's recorded activations), the
    population standard deviation (ddof 0) of the projection <x, d> on each unit direction d of
    `directions: [S, K, W]`, per step. One step at a time in float64, centred before
    projecting: memory stays at one step's activations and float16 inputs lose nothing."""
    out = torch.empty(directions.shape[:2], dtype=torch.float64)
    for step in range(directions.shape[0]):
        xs = torch.from_numpy(np.asarray(x[:, step], dtype=np.float64))  # [N, W]
        out[step] = ((xs - xs.mean(dim=0)) @ directions[step].double().T).std(dim=0,
                                                                              correction=0)
    return out.float()


class ProbeSet:
    FILE = "probes.safetensors"
    LAYOUT = 2  # the tensors it holds; in the localize fingerprint (2: sigma added)

    def __init__(self, root: Path, expect: Provenance | None = None):
        self.root = Path(root)
        if not self.is_complete(self.root):
            raise UserError(f"no complete probe set at {self.root} (no manifest.json): point "
                            "steer.probes at a localize artefact, or run localize")
        if found := damage(self.root):
            raise UserError(f"the probe set at {self.root} is damaged: {'; '.join(found)}. "
                            "Delete it and run localize again")
        self.meta = read_json(self.root / "meta.json")
        if expect is not None:
            expect.check(self.meta["provenance"], self.root)
        self.classes: list[str] = self.meta["classes"]
        self.layers: list[str] = self.meta["layers"]
        self.scores = pd.read_parquet(self.root / "scores.parquet")

    @staticmethod
    def is_complete(root: Path) -> bool:
        return is_sealed(root)

    def _tensor(self, layer: str, field: str) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"no probes for layer {layer!r} in {self.root}; "
                           f"probed layers: {self.layers}")
        with safe_open(self.root / self.FILE, framework="pt") as f:
            return f.get_tensor(f"{layer}/{field}")

    def directions(self, layer: str, source: str = "probe") -> torch.Tensor:
        """`[steps, classes, width]` unit directions in raw activation space, from the fitted
        probe (`probe`) or from the difference of class means (`mean_diff`)."""
        return self._tensor(layer, _key("direction", source))

    def sigmas(self, layer: str, source: str = "probe") -> torch.Tensor:
        """`[steps, classes]`: the spread of the collected activations along each of
        `directions(layer, source)` (`projection_std`)."""
        with safe_open(self.root / self.FILE, framework="pt") as f:
            if f"{layer}/{_key('sigma', source)}" not in f.keys():
                raise UserError(f"the probe set at {self.root} holds no sigma (it predates "
                                "steer.units=sigma): run localize again, or use steer.units=raw")
        return self._tensor(layer, _key("sigma", source))

    @classmethod
    def write(cls, root: Path, provenance: Provenance, classes: list[str], backend: str,
              fits: dict[str, ProbeFit], mean_diffs: dict[str, ProbeFit],
              scores: pd.DataFrame, store: ActivationStore) -> ProbeSet:
        """Write the probe set; `store` holds the activations the sigmas are measured on."""
        root.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, fit in fits.items():
            tensors |= {f"{layer}/mean": fit.mean, f"{layer}/scale": fit.scale,
                        f"{layer}/weight": fit.weight, f"{layer}/bias": fit.bias}
            x = store[layer]
            for source, each in zip(SOURCES, (fit, mean_diffs[layer]), strict=True):
                directions = each.directions(len(classes)).detach().cpu()
                tensors[f"{layer}/{_key('direction', source)}"] = directions
                tensors[f"{layer}/{_key('sigma', source)}"] = projection_std(x, directions)
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
        # One key: safetensors writes its metadata map in a random order, and equal probe sets
        # must be equal files.
        metadata = {"icm_lab": json.dumps({"provenance": asdict(provenance), "classes": classes,
                                           "backend": backend}, sort_keys=True)}
        with atomic(root / cls.FILE) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        write_table(scores, root / "scores.parquet")
        write_table(scores, root / "scores.csv")
        write_json(root / "meta.json", {
            "provenance": asdict(provenance), "classes": classes, "backend": backend,
            "layers": list(fits), "n_steps": int(scores["step"].max()) + 1,
        })
        seal(root)
        return cls(root, expect=provenance)


def _key(field: str, source: str) -> str:
    """A tensor's name within a layer: `direction`, `sigma` for the probe's, else suffixed."""
    return field if source == "probe" else f"{field}_{source}"
