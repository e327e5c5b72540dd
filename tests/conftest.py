"""Tests run on the CPU, offline: nothing here may touch the network."""

import os
import struct
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import icm_lab  # noqa: E402, F401  (first: it sets OpenMP's spin count before torch loads)

# isort: split
import pytest  # noqa: E402
import torch  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from icm_lab.config.compose import compose_config  # noqa: E402
from icm_lab.io.files import HOST  # noqa: E402
from icm_lab.models.adapters import layer_registry  # noqa: E402
from icm_lab.stages.components import build  # noqa: E402

torch.set_num_threads(2)


# Most tests run the random tiny SD1.5 twin on a people concept; the toy world has its own tests.
# Tests rank layers=auto by separability unless they test the causal map (the map steers every
# layer alone: minutes on the tiny twins), and score probes over 2 folds, which their dozen
# images allow (5 need 5 prompts per class). The toy science tests run the true defaults.
TEST_DEFAULTS = {"model": "tiny_sd15", "concept": "gender", "layers.rank_by": "separability",
                 "localize.folds": 2}


def make_config(*overrides: str):
    chosen = {o.split("=")[0].lstrip("+~") for o in overrides}
    if "experiment" in chosen:  # an experiment picks its own model and concept
        chosen |= set(TEST_DEFAULTS)
    defaults = [f"{k}={v}" for k, v in TEST_DEFAULTS.items() if k not in chosen]
    return compose_config([*defaults, *overrides])


@pytest.fixture(scope="session")
def tiny():
    """name -> (pipeline, registry, ModelSpec), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            spec = build(make_config(f"model={name}").model, "model")
            pipe = spec.load()
            cache[name] = (pipe, layer_registry(pipe, spec.resolution), spec)
        return cache[name]

    return get


def wandb_records(run_file) -> list:
    """The protobuf records of an offline W&B run file (`run-*.wandb`): a LevelDB-style log of
    32 KiB blocks after a 7-byte header, each record chunked as FULL, or FIRST/MIDDLE/LAST."""
    data, block, pos, chunks, records = Path(run_file).read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks = (chunks if kind in (3, 4) else b"") + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def dead_pid() -> int:
    """The pid of a process of this host that has ended (its temporaries are leftovers)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def temporary_name(name: str, pid: int) -> str:
    """The name `files.atomic` gives a temporary of `name` written by `pid` on this host."""
    return f".{name}.{HOST}.{pid}.0.tmp"
