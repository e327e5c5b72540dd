"""How every file of the project is written: under a temporary name that records its owner
(host and pid), then renamed into place, group-readable. Readers see the whole file or none; a
job killed mid-write leaves only a temporary, which `remove_dead_temporaries` deletes once its
owner is gone; a full disk ends the run with one line and nothing partial kept."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from icm_lab.core.errors import UserError

HOST = socket.gethostname().replace(".", "_")  # temporaries are split on dots
_umask = os.umask(0)
os.umask(_umask)
FILE_MODE, DIR_MODE = 0o666 & ~_umask, 0o777 & ~_umask  # 0644 / 0755 under the usual umask
_serial = itertools.count()  # tells apart temporaries of one process (threads, nesting)


class DiskFullError(UserError, OSError):
    pass


def disk_full(path: Path) -> DiskFullError:
    return DiskFullError(f"the disk is full: could not write {path}. Nothing partial was kept; "
                         f"free space under {Path(path).parent} and rerun (finished work is "
                         "reused).")


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed to `path` when the block ends cleanly,
    deleted otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{next(_serial)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # some writers (safetensors, mkstemp) create files 0600
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise disk_full(path) from error
        raise


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, as Python raises it or as a Rust writer (safetensors) reports it in its text."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC
            or f"os error {errno.ENOSPC})" in str(error))


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_table(table: pd.DataFrame, path: Path) -> None:
    """A table as `.parquet` or `.csv`, by the suffix."""
    with atomic(path) as tmp:
        if path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)


def write_image(image: Any, path: Path) -> None:
    """A PIL image, in the format its suffix names."""
    with atomic(path) as tmp:
        image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def write_figure(figure: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure, in the format its suffix names."""
    with atomic(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip("."))


def _owner_gone(tmp: Path) -> bool:
    """Whether the job that named this temporary (`.<name>.<host>.<pid>.<n>.tmp`) has ended.
    Another host's jobs cannot be checked from here: their temporaries are kept."""
    parts = tmp.name.rsplit(".", 4)
    if len(parts) != 5 or parts[1] != HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_dead_temporaries(root: Path) -> list[Path]:
    """Delete the temporaries under `root` whose owner is gone; return them."""
    dead = [path for path in Path(root).rglob(".*.tmp") if _owner_gone(path)]
    for path in dead:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return dead
