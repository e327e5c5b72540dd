"""Steering methods (`method=`, `conf/method/*.yaml` through `_target_`): which layers a method
writes to, which directions it adds there, and which prompts it generates from.

    icm         the selected layers (`layers=`), probe directions: the paper's method
    attn2       the cross-attention layers of the selected blocks: self vs cross
    all_layers  every attn1 and attn2 layer
    hspace      the U-Net bottleneck (h-space)
    random      the selected layers, one random direction per layer and class, with ICM's
                norm at each step: the control
    prompt      no hooks; the target class's word appended to the prompt
    none        nothing: the steered images are the base images
"""

from __future__ import annotations

from typing import ClassVar

import torch

from icm_lab.core.layers import LayerInfo, LayerRegistry
from icm_lab.models.adapters import ModelAdapter
from icm_lab.probing.probeset import ProbeSet
from icm_lab.steering.plans import LayerEdit, calibrated_edit, calibrated_scale


class SteeringMethod:
    name: ClassVar[str]
    uses_probes: ClassVar[bool] = True  # directions (or the layers=auto ranking) from probes
    generates: ClassVar[bool] = True  # False: the steered images are the base images

    def layers(self, chosen: list[LayerInfo], registry: LayerRegistry,
               adapter: ModelAdapter) -> list[LayerInfo]:
        """The layers written to, given the `layers=` selection."""
        return list(chosen)

    def edit(self, layer: LayerInfo, probes: ProbeSet, source: str, units: str, n_steps: int,
             n_classes: int, seed: int, index: int) -> LayerEdit:
        """What one steered layer (the `index`-th) gets: `[steps, classes, width]` unit
        directions and their scale in `units`; by default the layer's own probe directions
        from `source`, with their own sigma."""
        return calibrated_edit(probes, layer.name, source, units)

    def prompt(self, prompt: str, class_word: str) -> str:
        """The prompt a sample steered toward the class of `class_word` is generated from."""
        return prompt

    def source(self, configured: str) -> str | None:
        """Where the added directions come from (`steer.direction` unless the method decides)."""
        return configured if self.uses_probes else None

    def __repr__(self) -> str:
        return f"method={self.name}"


class Icm(SteeringMethod):
    name = "icm"


class CrossAttention(SteeringMethod):
    name = "attn2"

    def layers(self, chosen, registry, adapter):
        return [adapter.cross_attention_of(layer, registry) for layer in chosen]


class AllLayers(SteeringMethod):
    name = "all_layers"

    def layers(self, chosen, registry, adapter):
        return registry.select("attn1") + registry.select("attn2")


class HSpace(SteeringMethod):
    name = "hspace"

    def layers(self, chosen, registry, adapter):
        return registry.select("bottleneck")


class RandomDirections(SteeringMethod):
    """The control: ICM's layers and the norm of ICM's vector at each layer, step and class,
    along one random unit direction per layer and class (seeded by the run's seed and the
    layer's index), the same at every step: it differs from ICM only in direction."""

    name = "random"

    def source(self, configured):
        return "random"

    def edit(self, layer, probes, source, units, n_steps, n_classes, seed, index):
        g = torch.Generator().manual_seed(seed * 1000 + index)
        drawn = torch.nn.functional.normalize(
            torch.randn(n_classes, layer.width, generator=g), dim=-1)
        return LayerEdit(layer.name, drawn.expand(n_steps, -1, -1).clone(),
                         calibrated_scale(probes, layer.name, source, units))


class PromptSuffix(SteeringMethod):
    name = "prompt"
    uses_probes = False

    def layers(self, chosen, registry, adapter):
        return []

    def prompt(self, prompt, class_word):
        return f"{prompt}, {class_word}"


class NoSteering(SteeringMethod):
    name = "none"
    uses_probes = False
    generates = False

    def layers(self, chosen, registry, adapter):
        return []
