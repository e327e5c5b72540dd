"""icm_lab: find where text-to-image diffusion models make implicit choices, and change them."""

import os
from pathlib import Path

# Before torch loads GNU OpenMP: its threads spin this many times at a barrier before they sleep
# (300,000 by default). On a shared machine a spinning team waits on a descheduled member: toy
# generation of 64 images took 19.1 s beside 3 busy processes, 7.9 s with 30,000, and the same
# 1.7 s either way on an idle machine (`make bench`, BENCHMARKS.md). A user's setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from omegaconf import OmegaConf  # noqa: E402

__version__ = "0.1.0"

# `${package_path:toy/weights}` in a config: a path inside the installed package (the toy world's
# shipped weights), wherever the package lives.
OmegaConf.register_new_resolver(
    "package_path", lambda relative="": str(Path(__file__).parent / relative), replace=True
)
