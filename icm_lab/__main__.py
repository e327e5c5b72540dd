"""Command line.

    python -m icm_lab [overrides...]          run the configured stages (Hydra; --help for more)
    python -m icm_lab -m key=a,b [...]        a multirun sweep
    python -m icm_lab layers [overrides...]   print the layer registry of the chosen model
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from icm_lab.config import CONFIG_DIR, compose_config

GUIDE = [  # what a run leaves to look at, relative to its directory
    ("metrics", "metrics.json"),
    ("separability heatmaps", "localize/separability.png"),
    ("layer ranking", "layer_ranking.png"),
    ("before/after grids", "steer/grids"),
    ("class distribution", "evaluate/distribution.png"),
]


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run_app(cfg: DictConfig) -> float | None:
    from icm_lab.runner import objective, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = run(cfg, run_dir)
    print(f"icm_lab: results in {run_dir} (stage artefacts are linked there by stage name)")
    for what, path in GUIDE:
        if (run_dir / path).exists():
            print(f"  {what:<24} {run_dir / path}")
    return objective(cfg, results.get("evaluate"))  # for optimising sweepers (sweeps/optuna)


def layers_command(overrides: list[str]) -> None:
    """Print the hook points (name, kind, width, resolution) of `model=...`."""
    from icm_lab.models.layers import layer_registry
    from icm_lab.models.loading import load_pipeline

    cfg = compose_config(overrides)
    registry = layer_registry(load_pipeline(cfg.model), cfg.model.resolution)
    table = registry.table()
    print(f"{cfg.model.name}: {len(table)} hook points at {cfg.model.resolution} px "
          f"({table.kind.value_counts().to_dict()})")
    print(table.to_string(index=False))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "layers":
        layers_command(sys.argv[2:])
    else:
        run_app()


if __name__ == "__main__":
    main()
