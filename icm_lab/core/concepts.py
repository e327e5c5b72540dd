"""Concepts: the implicit attribute, its classes and prompts, read from `conf/concept/*.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from icm_lab.core.errors import ConfigError


@dataclass(frozen=True)
class Concept:
    name: str
    classes: tuple[str, ...]
    neutral_prompts: tuple[str, ...]  # leave the attribute unspecified
    explicit_prompts: dict[str, tuple[str, ...]]  # name the class
    class_words: dict[str, tuple[str, ...]]
    classifier_texts: dict[str, tuple[str, ...]]  # the labeler's text group per class
    eval_prompts: tuple[str, ...]
    target: np.ndarray  # target distribution over classes
    templates: tuple[str, ...] = ()
    # neutral prompt -> (template, subject) it was made from
    source_of: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    oracle_attribute: str | None = None  # the toy world's attribute (labeler=oracle)
    fairface_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # labeler=fairface

    def explicit_for(self, neutral_prompt: str, class_name: str) -> str:
        """The neutral prompt with the class named, by its first word: "a photo of a person" ->
        "a photo of a woman"; a word with a slot modifies the subject: "red {}" turns "a small
        circle" into "a small red circle"."""
        if class_name not in self.classes:
            raise ConfigError(f"unknown class {class_name!r}; valid: {list(self.classes)}")
        if neutral_prompt not in self.source_of:
            raise ConfigError(f"{neutral_prompt!r} is not a neutral prompt of {self.name!r}")
        template, subject = self.source_of[neutral_prompt]
        return template.format(_name(self.class_words[class_name][0], subject))

    def word(self, class_name: str) -> str:
        """The class's first word as a phrase of its own: "a woman"; "red {}" -> "red"."""
        return " ".join(self.class_words[class_name][0].replace("{}", " ").split())

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Concept:
        names = tuple(cfg.classes)
        if len(names) < 2:
            raise ConfigError(f"concept {cfg.name!r} needs at least 2 classes, got {list(names)}")
        templates = list(cfg.templates)
        words = {k: tuple(cfg.classes[k].words) for k in names}
        texts = {k: tuple(cfg.classes[k].texts) for k in names}
        empty = [k for k in names if not texts[k] or not words[k]]
        if empty:
            raise ConfigError(f"concept {cfg.name!r}: classes {empty} need `words` and `texts`")
        subjects = list(cfg.subjects)
        return cls(
            name=cfg.name,
            classes=names,
            neutral_prompts=tuple(t.format(s) for t in templates for s in subjects),
            explicit_prompts={k: tuple(dict.fromkeys(
                t.format(_name(w, s)) for t in templates for w in words[k] for s in subjects))
                for k in names},
            class_words=words,
            classifier_texts=texts,
            eval_prompts=tuple(cfg.eval_prompts),
            target=_target(cfg.get("target"), names, cfg.name),
            templates=tuple(templates),
            source_of={t.format(s): (t, s) for t in templates for s in subjects},
            oracle_attribute=cfg.get("oracle"),
            fairface_labels={k: tuple(cfg.classes[k].fairface) for k in names
                             if cfg.classes[k].get("fairface")},
        )


def _name(word: str, subject: str) -> str:
    """A class word replaces the subject ("a woman"), or modifies it ("red {}")."""
    return word.format(subject) if "{}" in word else word


def _target(values: object, classes: tuple[str, ...], concept: str) -> np.ndarray:
    if values is None:
        return np.full(len(classes), 1.0 / len(classes))
    target = np.asarray(list(values), dtype=float)
    if target.shape != (len(classes),) or (target < 0).any() or not np.isclose(target.sum(), 1):
        raise ConfigError(
            f"concept {concept!r}: target {list(values)} must be {len(classes)} non-negative "
            f"shares summing to 1, one per class {list(classes)}"
        )
    return target
