"""Artefact provenance: every artefact records the model and config fingerprint it came from,
and a reader refuses one that does not match what it expects."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icm_lab.errors import UserError

SCHEMA_VERSION = 2  # bump when an artefact layout changes, so old artefacts are not reused


class ArtefactMismatchError(UserError, RuntimeError):
    pass


def fingerprint(**parts: Any) -> str:
    """A short stable hash of config sections (DictConfigs resolved) and plain values."""
    plain = {
        key: OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
        for key, value in parts.items()
    }
    text = json.dumps({"schema": SCHEMA_VERSION, **plain}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    stage: str
    model: str
    concept: str
    fingerprint: str

    def check(self, found: dict[str, Any], where: Path | str) -> None:
        """Raise unless `found` (a provenance read from disk) is this one."""
        expected = asdict(self)
        diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if diff:
            lines = "\n".join(f"  {k}: artefact has {a!r}, this run expects {b!r}"
                              for k, (a, b) in diff.items())
            raise ArtefactMismatchError(
                f"the {self.stage} artefact at {where} was made by another model or config:\n"
                f"{lines}\nPoint this run at a matching artefact, or delete it to recompute."
            )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


_held: dict[Path, int] = {}  # locks this process holds, with their nesting depth


@contextmanager
def artefact_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the artefact at `root` (the file `<root>.lock`) for the `with` block,
    between processes and re-entrant within one. The OS drops it when the holder dies, so a
    killed job never leaves a stale lock behind."""
    path = Path(root).resolve()
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    with open(path.parent / f"{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
