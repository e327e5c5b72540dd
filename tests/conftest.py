"""Tests run on the CPU, offline: nothing here may touch the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"

import pytest  # noqa: E402
import torch  # noqa: E402

from icm_lab.config import compose_config  # noqa: E402
from icm_lab.models.layers import layer_registry  # noqa: E402
from icm_lab.models.loading import load_pipeline  # noqa: E402

torch.set_num_threads(2)


def make_config(*overrides: str):
    return compose_config(overrides)


@pytest.fixture(scope="session")
def tiny():
    """name -> (pipeline, registry, model config), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = make_config(f"model={name}").model
            pipe = load_pipeline(cfg)
            cache[name] = (pipe, layer_registry(pipe, cfg.resolution), cfg)
        return cache[name]

    return get
