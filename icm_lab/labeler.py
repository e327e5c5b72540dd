"""CLIP zero-shot labelling: which class does each generated image show?

Each class has a group of texts; a class scores the best image-text similarity within its group,
and a softmax over class scores (at CLIP's own temperature) gives a probability per class. An
image whose top probability is below `min_confidence` is labelled `undecided`, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from icm_lab.concepts import Concept
from icm_lab.models.clip import Clip

UNDECIDED = "undecided"


@dataclass
class Labels:
    classes: tuple[str, ...]
    probs: np.ndarray  # [N, K]
    labels: list[str]  # a class name or UNDECIDED


class ClipLabeler:
    def __init__(self, clip: Clip, concept: Concept, min_confidence: float):
        if not 0 <= min_confidence <= 1:
            raise ValueError(f"labeler.min_confidence must be in [0, 1], got {min_confidence}")
        self.clip, self.classes = clip, concept.classes
        self.min_confidence = min_confidence
        texts = [text for k in self.classes for text in concept.classifier_texts[k]]
        self.group = torch.tensor(
            [i for i, k in enumerate(self.classes) for _ in concept.classifier_texts[k]]
        )
        self.text_features = clip.encode_texts(texts)

    def __call__(self, images: list[Image.Image]) -> Labels:
        if not images:
            raise ValueError("the labeler got zero images")
        probs = self._probs(images)
        labels = [
            self.classes[k] if p[k] >= self.min_confidence else UNDECIDED
            for p, k in zip(probs, probs.argmax(axis=1), strict=True)
        ]
        return Labels(self.classes, probs, labels)

    def _probs(self, images: list[Image.Image]) -> np.ndarray:
        similarity = (self.clip.encode_images(images) @ self.text_features.T).cpu()  # [n, texts]
        scores = torch.full((len(images), len(self.classes)), -torch.inf)
        scores = scores.scatter_reduce(
            1, self.group.expand(len(images), -1), similarity, reduce="amax"
        )
        scale = self.clip.model.logit_scale.exp().item()
        return torch.softmax(scale * scores, dim=1).numpy()
