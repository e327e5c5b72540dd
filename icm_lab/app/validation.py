"""The validation pass: every user-facing value is checked when the config is composed, before
a model is loaded or anything is written, so a typo costs seconds, not a collection.

Plain sections become their schema dataclasses (ranges, allowed values); components are built
once (`stages.components.build_components`: `model`, `method`, `probe` instantiated, `labeler`,
`clip`, `logger` as partials whose options are bound to their class here); layer names are
checked against the model's registry, read from the denoiser's config without loading weights.
`validate` returns the components, and the run uses them.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from icm_lab.config.schema import STAGES
from icm_lab.core.concepts import Concept
from icm_lab.core.errors import ConfigError, ModelUnavailable, UserError, choices_error
from icm_lab.core.layers import LayerRegistry
from icm_lab.evaluation.metrics import reference_statistics
from icm_lab.io.artefacts import VERIFY_CHOICES
from icm_lab.models.clip import check_available as check_clip_weights
from icm_lab.probing.probeset import ProbeSet
from icm_lab.stages.components import Components, build_components
from icm_lab.steering.methods import SteeringMethod


def _bind(make: partial, key: str, **supplied: Any) -> None:
    """Refuse options the component's class does not take."""
    try:
        inspect.signature(make.func).bind(**supplied, **make.keywords)
    except TypeError as error:
        raise ConfigError(f"{key}: {error} (options given: {sorted(make.keywords)})") from None


# What the pre-check validated before Hydra started, by the resolved config, for the run it
# then starts: the pair checks and builds one config once. Each entry serves one run.
_PRECHECKED: dict[str, Components] = {}


def validate(cfg: DictConfig, keep: bool = False) -> Components:
    """The config's components, built (`build_components`) and checked; a ConfigError (one
    line: key, value, valid choices) for the first bad value. `keep`: the pre-check's, kept
    for the run that follows, which takes them instead of checking again."""
    try:
        key = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:  # `${hydra:...}` outside a Hydra job: checked, not kept
        return _checked(cfg)
    if not keep and key in _PRECHECKED:
        return _PRECHECKED.pop(key)
    parts = _checked(cfg)
    if keep:
        _PRECHECKED[key] = parts
    return parts


def _checked(cfg: DictConfig) -> Components:
    unknown = [stage for stage in cfg.stages if stage not in STAGES]
    if unknown or not cfg.stages:
        raise choices_error("stages", list(cfg.stages), STAGES)
    if not (isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**31):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer in [0, 2**31)")  # numpy's range
    if cfg.paths.get("verify", "sizes") not in VERIFY_CHOICES:
        raise choices_error("paths.verify", cfg.paths.verify, VERIFY_CHOICES)
    parts = build_components(cfg)
    model, concept, sections = parts.model, parts.concept, parts.sections
    model.check_concept(concept.name)
    model.check_available()  # before the CLIP's: the model is what a new user lacks first
    _check_labeler(parts.labeler, concept)
    _check_clip(cfg.clip, parts.clip)
    _bind(parts.logger, "logger", run_dir=None, config={}, name="", group=None)
    _check_paths(sections)
    found = model.registry_without_weights()
    if found is not None:
        _check_layers(*found, sections, parts.method)
    return parts


def _check_labeler(make: partial, concept: Concept) -> None:
    supplied = {"concept": concept} | ({"clip": None} if make.func.uses_clip else {})
    _bind(make, "labeler", **supplied)
    make.func.check(concept, **make.keywords)


def _check_clip(clip: DictConfig, make: partial) -> None:
    _bind(make, "clip")
    if not (isinstance(clip.batch_size, int) and clip.batch_size >= 1):
        raise ConfigError(f"clip.batch_size={clip.batch_size!r} must be a positive integer")
    if clip.model not in open_clip.list_models():
        raise choices_error("clip.model", clip.model, open_clip.list_models())
    pretrained = clip.pretrained
    if pretrained and ("/" in pretrained or Path(pretrained).suffix) and not Path(
            pretrained).exists():
        raise ModelUnavailable(f"clip.pretrained={pretrained!r} is not a file; pass an open_clip "
                               "tag (e.g. openai) or the path of a checkpoint")
    check_clip_weights(clip.model, pretrained)


def _check_paths(sections: dict[str, Any]) -> None:
    if sections["eval"].features == "inception" and not importlib.util.find_spec(
            "torch_fidelity"):
        raise ConfigError("eval.features=inception needs torch-fidelity (`pip install "
                          "torch-fidelity`; its Inception weights download on first use); "
                          "eval.features=clip needs neither")
    reference = sections["eval"].reference_dir
    if reference and not Path(reference).is_dir():
        raise UserError(f"eval.reference_dir={reference!r} is not a folder of images")
    statistics = sections["eval"].reference_stats
    if statistics:
        reference_statistics(statistics)  # readable, with mu and sigma of matching shapes
    probes = sections["steer"].probes
    if probes and not ProbeSet.is_complete(Path(probes)):
        raise UserError(f"steer.probes={probes!r} holds no complete probe set (no manifest.json); "
                        "pass the localize/ folder of a finished run")


def _check_layers(registry: LayerRegistry, adapter, sections: dict[str, Any],
                  method: SteeringMethod) -> None:
    """Layer names in `layers=` and `collect.record` exist, and the method can steer them."""
    recorded = registry.resolve(sections["collect"].record)
    layers = sections["layers"]
    explicit = isinstance(layers.select, list | tuple)
    if not explicit and layers.select == "auto":  # ranked among the recorded layers of a kind
        candidates = [layer for layer in recorded if layer.kind == layers.kind]
        if method.uses_probes and not candidates and not sections["steer"].probes:
            raise ConfigError(f"layers=auto ranks {layers.kind} layers, but collect.record="
                              f"{list(sections['collect'].record)} records none; add "
                              f"{layers.kind} or change layers.kind")
        return
    chosen = registry.select(list(layers.select) if explicit else layers.select)
    steered = method.layers(chosen, registry, adapter)
    missing = [layer.name for layer in steered if layer not in recorded]
    if method.uses_probes and missing and not sections["steer"].probes:
        raise ConfigError(f"{method} steers {missing}, which collect.record="
                          f"{list(sections['collect'].record)} does not record; add them")
