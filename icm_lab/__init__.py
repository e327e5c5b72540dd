"""icm_lab: find where text-to-image diffusion models make implicit choices, and change them."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${package_path:toy/weights}` in a config: a path inside the installed package (the toy world's
# shipped weights), wherever the package lives.
OmegaConf.register_new_resolver(
    "package_path", lambda relative="": str(Path(__file__).parent / relative), replace=True
)
