"""The command line (`python -m icm_lab`, `icm-lab`: `icm_lab.__main__` starts it).

    python -m icm_lab [overrides...]            run the configured stages (Hydra; --help for more)
    python -m icm_lab -m key=a,b [...]          a multirun sweep
    python -m icm_lab layers [overrides...]     print the layer registry of the chosen model
    python -m icm_lab replay PLAN [--out DIR]   regenerate a run's steered images from its plan
    python -m icm_lab reference-stats FOLDER OUT.npz [overrides...]
                                                FID reference statistics of an image folder

An expected failure (a bad value, missing weights or artefacts) ends with one line on stderr
and exit status 2; HYDRA_FULL_ERROR=1 shows the traceback instead.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from icm_lab.app.replay import replay
from icm_lab.app.runner import objective, run
from icm_lab.app.validation import validate
from icm_lab.config.compose import CONFIG_DIR, SWEEPS_DIR, compose_config
from icm_lab.config.schema import choices_of
from icm_lab.core.errors import UserError, choices_error
from icm_lab.evaluation.metrics import FEATURES, save_reference_statistics
from icm_lab.models.adapters import layer_registry
from icm_lab.stages.components import build
from icm_lab.stages.evaluate import image_files

GUIDE = [  # what a run leaves to look at, relative to its directory
    ("metrics", "metrics.json"),
    ("separability heatmaps", "localize/separability.png"),
    ("layer ranking", "layer_ranking.png"),
    ("causal map", "causal/causal.png"),
    ("causal vs separability", "causal/causal_vs_separability.png"),
    ("before/after grids", "steer/grids"),
    ("steering plan", "steer/plan.json"),
    ("class distribution", "evaluate/distribution.png"),
]


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run_app(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        results = run(cfg, run_dir)  # a failing job is reported by Hydra's launcher
    else:
        results = _one_line_errors(lambda: run(cfg, run_dir))
    print(f"icm_lab: results in {run_dir} (stage artefacts are linked there by stage name)")
    for what, path in GUIDE:
        if (run_dir / path).exists():
            print(f"  {what:<24} {run_dir / path}")
    return objective(cfg, results.get("evaluate"))  # for optimising sweepers (sweeps/optuna)


def group_options(group: str) -> list[str]:
    """The options of a config group (`conf/<group>/*.yaml`; `sweep` from sweeps/)."""
    folder = SWEEPS_DIR if group == "sweep" else CONFIG_DIR / group
    return sorted(path.stem for path in folder.glob("*.yaml"))


def error_line(error: Exception) -> str:
    """One line for an expected failure: Hydra's and OmegaConf's composition errors included."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, bad = Path(error.missing_cfg_file).parent.as_posix(), Path(
            error.missing_cfg_file).name
        line = str(choices_error(group, bad, group_options(group)))
        if group == "layers":  # `layers=[a,b]` reads as a list of layer sets
            line += (", or give layer names as layers.select=[name,...] (`python -m icm_lab "
                     "layers model=...` lists them)")
        return line
    if isinstance(error, HydraException) and isinstance(error.__cause__, OmegaConfBaseException):
        error = error.__cause__  # "Error merging override ...": the value's own complaint
    if isinstance(error, OmegaConfBaseException):
        key = getattr(error, "full_key", None)
        choices = choices_of(getattr(error, "object_type", None), getattr(error, "key", None))
        if key and choices:  # a choice field: the same line as every other refused choice
            return str(choices_error(key, getattr(error, "value", None), choices))
        message = getattr(error, "msg", str(error)).splitlines()[0]
        return f"{key}: {message}" if key else message
    return str(error).strip().splitlines()[0] if isinstance(error, HydraException) else str(error)


def _one_line_errors(action: Callable):
    """Run `action`; an expected failure prints one line and exits 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return action()
    try:
        return action()
    except (UserError, HydraException, OmegaConfBaseException) as error:
        print(f"icm_lab: error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Compose and validate a single run's config, or every job of a plain sweep (`-m` with
    comma lists), before Hydra starts, so a bad value is refused in one line with nothing
    written (no run directory, no artefact, no lock) and no job run first."""
    flags = [arg for arg in argv if arg.startswith("-")]
    overrides = [arg for arg in argv if not arg.startswith("-")]
    if not flags:
        _one_line_errors(lambda: validate(compose_config(overrides), keep=True))
    elif set(flags) <= {"-m", "--multirun"}:
        _one_line_errors(lambda: [validate(compose_config(job)) for job in sweep_jobs(overrides)])


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a plain sweep as Hydra's basic sweeper expands them (every combination of
    the comma lists), without Hydra's own settings; none for sweeps whose values come from a
    config (`+sweep=`, another sweeper), which are checked job by job as they start."""
    if any(o.startswith(("+sweep", "hydra/sweeper")) or "(" in o for o in overrides):
        return []
    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    return product_of_choices(parsed)


def product_of_choices(parsed: list[Override]) -> list[list[str]]:
    """Each job's overrides: the product of every choice sweep (`a=1,2 b=x,y`: 4 jobs), as
    Hydra's basic sweeper expands them."""
    choices: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"{key}: only choice sweeps (a,b,c) can be checked before "
                                 f"the sweep starts, not {override.value_type.name}")
    return [list(job) for job in itertools.product(*choices.values())]


def layers_command(overrides: list[str]) -> None:
    """Print the hook points (name, kind, width, resolution) of `model=...`."""
    spec = build(compose_config(overrides).model, "model")
    found = spec.registry_without_weights()  # seconds, and no weights needed
    registry = found[0] if found else layer_registry(spec.load(), spec.resolution)
    table = registry.table()
    print(f"{spec.name}: {len(table)} hook points at {spec.resolution} px "
          f"({table.kind.value_counts().to_dict()})")
    print(table.to_string(index=False))


def reference_stats_command(args: list[str]) -> None:
    """`reference-stats FOLDER OUT.npz [eval.features=inception ...]`: the `mu`/`sigma` of a
    folder's features, for `eval.reference_stats` (FID without keeping the images)."""
    if len(args) < 2 or "=" in args[0] or "=" in args[1]:
        raise UserError("usage: python -m icm_lab reference-stats FOLDER OUT.npz [overrides...]")
    cfg = compose_config(args[2:])
    features = FEATURES[cfg.eval.features](build(cfg.clip, "clip")())
    path = save_reference_statistics(image_files(args[0]), features, Path(args[1]))
    print(f"icm_lab: {cfg.eval.features} statistics of {args[0]} in {path}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["layers"]:
        _one_line_errors(lambda: layers_command(args[1:]))
    elif args[:1] == ["reference-stats"]:
        _one_line_errors(lambda: reference_stats_command(args[1:]))
    elif args[:1] == ["replay"]:
        sys.exit(_one_line_errors(lambda: replay(args[1:])))
    else:
        check_overrides(args)
        run_app()
