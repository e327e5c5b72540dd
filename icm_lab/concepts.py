"""Concepts: the implicit attribute, its classes and prompts, read from `conf/concept/*.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig


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
    template_of: dict[str, int] = field(default_factory=dict, repr=False)  # neutral -> template

    def explicit_for(self, neutral_prompt: str, class_name: str) -> str:
        """The neutral prompt's template filled with the class's first word: "a photo of a
        person" -> "a photo of a woman"."""
        if class_name not in self.classes:
            raise ValueError(f"unknown class {class_name!r}; valid: {list(self.classes)}")
        if neutral_prompt not in self.template_of:
            raise ValueError(f"{neutral_prompt!r} is not a neutral prompt of {self.name!r}")
        template = self.templates[self.template_of[neutral_prompt]]
        return template.format(self.class_words[class_name][0])

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Concept:
        names = tuple(cfg.classes)
        if len(names) < 2:
            raise ValueError(f"concept {cfg.name!r} needs at least 2 classes, got {list(names)}")
        templates = list(cfg.templates)
        words = {k: tuple(cfg.classes[k].words) for k in names}
        texts = {k: tuple(cfg.classes[k].texts) for k in names}
        empty = [k for k in names if not texts[k] or not words[k]]
        if empty:
            raise ValueError(f"concept {cfg.name!r}: classes {empty} need `words` and `texts`")
        return cls(
            name=cfg.name,
            classes=names,
            neutral_prompts=tuple(t.format(s) for t in templates for s in cfg.subjects),
            explicit_prompts={k: tuple(t.format(w) for t in templates for w in words[k])
                              for k in names},
            class_words=words,
            classifier_texts=texts,
            eval_prompts=tuple(cfg.eval_prompts),
            target=_target(cfg.get("target"), names, cfg.name),
            templates=tuple(templates),
            template_of={t.format(s): i for i, t in enumerate(templates) for s in cfg.subjects},
        )


def _target(values: object, classes: tuple[str, ...], concept: str) -> np.ndarray:
    if values is None:
        return np.full(len(classes), 1.0 / len(classes))
    target = np.asarray(list(values), dtype=float)
    if target.shape != (len(classes),) or (target < 0).any() or not np.isclose(target.sum(), 1):
        raise ValueError(
            f"concept {concept!r}: target {list(values)} must be {len(classes)} non-negative "
            f"shares summing to 1, one per class {list(classes)}"
        )
    return target
