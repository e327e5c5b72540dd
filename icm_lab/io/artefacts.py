"""Artefacts: the stage outputs shared by every run with the same fingerprint.

- Provenance: every artefact records the model and config fingerprint it came from, and a reader
  refuses one that does not match what it expects.
- Locks: one job computes an artefact while the others that need it wait.
- Seals: a finished artefact ends with `manifest.json` (written last) listing its files with
  sizes and content digests (`digest`: a file's sha256; for `.npy` arrays a sha256 over their
  rows' digests, so a writer can compute it as it fills rows). A reuse checks every file's size
  and header, and with
  `paths.verify=hashes` its hash too; `damage` says which file is wrong and how.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from icm_lab.core.errors import UserError
from icm_lab.io.files import write_json

SCHEMA_VERSION = 4  # bump when an artefact layout changes, so old artefacts are not reused


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
            found_vs_expected = "; ".join(f"{k}: artefact has {a!r}, this run expects {b!r}"
                                          for k, (a, b) in diff.items())
            raise ArtefactMismatchError(
                f"the {self.stage} artefact at {where} was made by another model or config "
                f"({found_vs_expected}): point this run at a matching artefact, or delete it "
                "to recompute"
            )


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


# -- seals -----------------------------------------------------------------------------------

MANIFEST = "manifest.json"
VERIFY_CHOICES = ("sizes", "hashes")
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def seal(root: Path, skip: tuple[str, ...] = (), known: dict[str, str] | None = None) -> None:
    """Mark the artefact at `root` finished: every file in it (but temporaries, and the folders
    `skip` names, about to be removed) with its size and `digest`, in `manifest.json`, written
    last and atomically. `known`: digests (by relative path) the writer computed as it wrote,
    so that sealing reads none of those files again."""
    root, known = Path(root), known or {}
    files = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if (path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp")
                and path.relative_to(root).parts[0] not in skip):
            files[name] = {"size": path.stat().st_size,
                           "digest": known[name] if name in known else digest(path)}
    write_json(root / MANIFEST, {"files": files})


def is_sealed(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def damage(root: Path, hashes: bool = False) -> list[str]:
    """What is wrong with the sealed artefact at `root`, one line per file: missing, another
    size than sealed (truncated or grown), an unreadable header, or (with `hashes`) other
    content. Empty when intact."""
    root = Path(root)
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return [f"{root / MANIFEST}: unreadable ({error})"]
    found = []
    for name, sealed in files.items():
        path = root / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif (size := path.stat().st_size) != sealed["size"]:
            found.append(f"{path}: {size} bytes, sealed with {sealed['size']} (truncated or "
                         "altered)")
        elif problem := header_problem(path):
            found.append(f"{path}: {problem}")
        elif hashes and digest(path) != sealed["digest"]:
            found.append(f"{path}: content differs from when it was sealed (digest)")
    return found


def header_problem(path: Path) -> str | None:
    """Why the file's header (by its suffix) does not describe a whole file, or None."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if path.suffix == ".npy":
                shape, dtype = _read_npy_header(f)
                expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
            elif path.suffix == ".safetensors":
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= size - 8:
                    return "unreadable safetensors header"
                header = json.loads(f.read(length))
                expected = 8 + length + max((entry["data_offsets"][1] for key, entry in
                                             header.items() if key != "__metadata__"), default=0)
            elif path.suffix == ".parquet":
                if f.read(4) != b"PAR1" or _tail(f, 4) != b"PAR1":
                    return "not a whole parquet file"
                return None
            elif path.suffix == ".png":
                if f.read(8) != _PNG_START or _tail(f, 8) != _PNG_END:
                    return "not a whole PNG image"
                return None
            elif path.suffix == ".json":
                json.loads(f.read())
                return None
            else:
                return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable header ({error})"
    return None if expected == size else f"its header says {expected} bytes, it has {size}"


def _tail(f: Any, n: int) -> bytes:
    f.seek(-n, 2)
    return f.read(n)


def digest(path: Path) -> str:
    """A file's sha256; for a `.npy` array, the sha256 of its header and of each row's digest
    (`npy_digest`), which a writer filling rows in any order can compute as it goes."""
    if path.suffix == ".npy" and header_problem(path) is None:  # else its rows are unknown
        array = np.load(path, mmap_mode="r")
        return npy_digest(npy_header(path), row_digests(array))
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


def row_digests(rows: np.ndarray) -> list[bytes]:
    """An 8-byte BLAKE2b digest of each row (first axis) of an array, as stored (C order):
    short, since a store keeps them per sample and layer until it is sealed."""
    return [hashlib.blake2b(np.ascontiguousarray(row).data, digest_size=8).digest()
            for row in rows]


def npy_header(path: Path) -> bytes:
    """The header bytes of a `.npy` file (everything before its data)."""
    with open(path, "rb") as f:
        _read_npy_header(f)
        length = f.tell()
        f.seek(0)
        return f.read(length)


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype, leaving `f` at the start of the data."""
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
    shape, _, dtype = read(f)
    return shape, dtype


def npy_digest(header: bytes, rows: list[bytes]) -> str:
    return hashlib.sha256(header + b"".join(rows)).hexdigest()
