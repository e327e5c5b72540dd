"""Labelers: which class of the concept does each generated image show? (`labeler=`)

- `clip`: open_clip zero-shot. Each class has a group of texts; a class scores the best
  image-text similarity within its group, and a softmax over class scores (at CLIP's own
  temperature) gives a probability per class.
- `oracle`: the toy world's pixel reader (icm_lab/toy/world.py): exact, one-hot.
- `fairface`: FairFace's ResNet-34 with its 18-logit head (7 race, 2 gender, 9 age logits), from
  a checkpoint the user gives, applied to every face crop found by OpenCV's frontal-face Haar
  cascade. A class's probability is the softmax mass of the FairFace labels mapped to it
  (`fairface:` per class in conf/concept/*.yaml), averaged over the image's faces; the number
  of faces is the image's weight (`Labels.weights`), so a prompt's soft frequencies are the
  mean over its face crops, as in the paper.

Each is built from `conf/labeler/*.yaml` through `_target_` (a partial: the run supplies the
concept, and the run's CLIP to labelers that set `uses_clip`).

An image whose top probability is below `min_confidence`, or with no face (fairface) or no object
(oracle), is labelled `undecided`: counted and reported, never dropped. Images without a reading
get NaN probabilities, so soft frequencies average over the images that have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.functional import normalize, to_tensor

from icm_lab.core.concepts import Concept
from icm_lab.core.errors import ConfigError, UserError
from icm_lab.models.clip import Clip
from icm_lab.models.loading import like_parameters, resolve_device
from icm_lab.toy import world

UNDECIDED = "undecided"


@dataclass
class Labels:
    classes: tuple[str, ...]
    probs: np.ndarray  # [N, K]; a NaN row: no reading at all
    labels: list[str]  # a class name or UNDECIDED
    # Readings behind each row (FairFace: faces found; the row is their mean), so that soft
    # frequencies average over readings, not images. None: one per row with a reading.
    weights: np.ndarray | None = None


class Labeler(Protocol):
    name: ClassVar[str]
    uses_clip: ClassVar[bool]
    classes: tuple[str, ...]

    def __call__(self, images: list[Image.Image]) -> Labels: ...


def decide(classes: tuple[str, ...], probs: np.ndarray, min_confidence: float,
           weights: np.ndarray | None = None) -> Labels:
    """The top class of each row, or UNDECIDED below `min_confidence` (or for a NaN row)."""
    confident = np.nan_to_num(probs.max(axis=1), nan=-1.0) >= min_confidence
    top = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
    labels = [classes[k] if ok else UNDECIDED for k, ok in zip(top, confident, strict=True)]
    return Labels(classes, probs, labels, weights)


def _check_confidence(min_confidence: float) -> None:
    if not 0 <= min_confidence <= 1:
        raise ConfigError(f"labeler.min_confidence must be in [0, 1], got {min_confidence}")


def _check_images(images: list) -> None:
    if not images:
        raise ValueError("the labeler got zero images")


class ClipLabeler:
    name, uses_clip = "clip", True

    @staticmethod
    def check(concept: Concept, min_confidence: float = 0.5) -> None:
        _check_confidence(min_confidence)

    def __init__(self, concept: Concept, clip: Clip, min_confidence: float = 0.5):
        self.check(concept, min_confidence)
        self.clip, self.classes = clip, concept.classes
        self.min_confidence = min_confidence
        texts = [text for k in self.classes for text in concept.classifier_texts[k]]
        self.group = torch.tensor(
            [i for i, k in enumerate(self.classes) for _ in concept.classifier_texts[k]]
        )
        self.text_features = clip.encode_texts(texts)

    def __call__(self, images: list[Image.Image]) -> Labels:
        _check_images(images)
        similarity = self.clip.encode_images(images) @ self.text_features.T  # [n, texts], CPU
        scores = torch.full((len(images), len(self.classes)), -torch.inf)
        scores = scores.scatter_reduce(
            1, self.group.expand(len(images), -1), similarity, reduce="amax"
        )
        scale = self.clip.model.logit_scale.exp().item()
        return decide(self.classes, torch.softmax(scale * scores, dim=1).numpy(),
                      self.min_confidence)


class OracleLabeler:
    """Exact labels for the toy world's concepts, read from the pixels."""

    name, uses_clip = "oracle", False

    def __init__(self, concept: Concept):
        self.check(concept)
        self.classes, self.attribute, self._read = concept.classes, concept.oracle_attribute, \
            world.oracle

    @staticmethod
    def check(concept: Concept) -> None:
        attribute = concept.oracle_attribute
        if attribute is None:
            raise ConfigError(f"labeler=oracle reads the toy world's pixels; concept "
                             f"{concept.name!r} has no `oracle:` attribute. Use labeler=clip "
                             "or labeler=fairface.")
        valid = {"color": world.COLORS, "size": world.SIZES, "shape": world.SHAPES}[attribute]
        unknown = [k for k in concept.classes if k not in valid]
        if unknown:
            raise ConfigError(f"concept {concept.name!r}: classes {unknown} are not toy-world "
                             f"{attribute}s; valid: {list(valid)}")

    def __call__(self, images: list[Image.Image]) -> Labels:
        _check_images(images)
        probs = np.full((len(images), len(self.classes)), np.nan)
        for row, image in enumerate(images):
            value = getattr(self._read(image), self.attribute)
            if value is not None:  # no object: a NaN row, undecided
                probs[row] = [float(value == k) for k in self.classes]
        return decide(self.classes, probs, 1.0)


FAIRFACE_LABELS = (  # the order of the 18 logits of FairFace's res34_fair_align_multi_7 model
    "White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian",
    "Middle Eastern", "Male", "Female", "0-2", "3-9", "10-19", "20-29", "30-39", "40-49",
    "50-59", "60-69", "70+",
)
FAIRFACE_HEADS = {"race": slice(0, 7), "gender": slice(7, 9), "age": slice(9, 18)}


class FairFaceLabeler:
    """FairFace on every frontal face in each image (the paper: all face crops).

    Face crops: OpenCV's `haarcascade_frontalface_default.xml` finds faces; each box is grown by
    `margin` of its side on every side (FairFace's dlib chips pad by 0.25), clipped to the
    image, squared, resized to 224 px and normalised with ImageNet statistics. An image's
    probabilities are the mean over its crops, its weight the number of crops; an image with no
    face has none (undecided, counted in n_undecided).
    """

    name, uses_clip = "fairface", False

    def __init__(self, concept: Concept, checkpoint: str | None = None,
                 min_confidence: float = 0.5, device: str = "auto", margin: float = 0.25,
                 batch_size: int = 32):
        self.check(concept, checkpoint, min_confidence)
        self.classes, self.min_confidence = concept.classes, min_confidence
        self.margin, self.batch_size = margin, batch_size
        self.device = resolve_device(device)
        self.head, self.mapping = _fairface_mapping(concept)
        self.model = load_fairface(checkpoint).to(self.device).eval()
        self._detector = cv2.CascadeClassifier(
            str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))

    @staticmethod
    def check(concept: Concept, checkpoint: str | None = None, min_confidence: float = 0.5,
              **_: object) -> None:
        _check_confidence(min_confidence)
        _fairface_mapping(concept)
        _check_checkpoint(checkpoint)

    def face_crops(self, image: Image.Image) -> list[Image.Image]:
        """Every face the detector finds, largest first."""
        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        side = min(gray.shape)
        faces = self._detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                                minSize=(max(8, side // 10),) * 2)
        faces = sorted(faces, key=lambda f: -f[2] * f[3])
        return [self._crop(image.convert("RGB"), *face) for face in faces]

    def _crop(self, image: Image.Image, x: int, y: int, w: int, h: int) -> Image.Image:
        half = max(w, h) / 2 + self.margin * max(w, h)
        cx, cy = x + w / 2, y + h / 2
        box = [max(0, cx - half), max(0, cy - half),
               min(image.width, cx + half), min(image.height, cy + half)]
        return image.crop(tuple(round(v) for v in box)).resize((224, 224))

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Labels:
        _check_images(images)
        crops = [(i, crop) for i, image in enumerate(images) for crop in self.face_crops(image)]
        owner = np.array([i for i, _ in crops], dtype=int)
        per_crop = np.zeros((len(crops), len(self.classes)))
        for start in range(0, len(crops), self.batch_size):
            chunk = [crop for _, crop in crops[start:start + self.batch_size]]
            batch = torch.stack([normalize(to_tensor(c), [0.485, 0.456, 0.406],
                                           [0.229, 0.224, 0.225]) for c in chunk])
            logits = self.model(like_parameters(batch, self.model)).float().cpu()[:, self.head]
            per_crop[start:start + len(chunk)] = (torch.softmax(logits, 1) @ self.mapping).numpy()
        weights = np.bincount(owner, minlength=len(images)).astype(float)
        sums = np.zeros((len(images), len(self.classes)))
        np.add.at(sums, owner, per_crop)
        with np.errstate(invalid="ignore"):  # no face: 0 / 0, a NaN row
            probs = sums / weights[:, None]
        return decide(self.classes, probs, self.min_confidence, weights)


def _fairface_mapping(concept: Concept) -> tuple[slice, torch.Tensor]:
    """The FairFace head the concept reads and a [head labels, classes] 0/1 matrix."""
    if not concept.fairface_labels:
        raise ConfigError(f"labeler=fairface needs `fairface:` labels per class in concept "
                         f"{concept.name!r}; valid labels: {list(FAIRFACE_LABELS)}")
    for labels in concept.fairface_labels.values():
        unknown = [label for label in labels if label not in FAIRFACE_LABELS]
        if unknown:
            raise ConfigError(f"concept {concept.name!r}: unknown FairFace labels {unknown}; "
                             f"valid: {list(FAIRFACE_LABELS)}")
    first = FAIRFACE_LABELS.index(next(iter(concept.fairface_labels.values()))[0])
    head = next(s for s in FAIRFACE_HEADS.values() if s.start <= first < s.stop)
    names = FAIRFACE_LABELS[head]
    mapping = torch.zeros(len(names), len(concept.classes))
    for k, cls in enumerate(concept.classes):
        for label in concept.fairface_labels[cls]:
            if label not in names:
                raise ConfigError(f"concept {concept.name!r}: FairFace labels of one concept "
                                 f"must come from one head; {label!r} is not in {list(names)}")
            mapping[names.index(label), k] = 1
    return head, mapping


def _check_checkpoint(checkpoint: str | None) -> None:
    if not checkpoint or not Path(checkpoint).is_file():
        raise UserError(
            f"labeler.checkpoint={checkpoint!r} is not a file. Download FairFace's "
            "res34_fair_align_multi_7_20190809.pt (github.com/joojs/fairface) and pass its path.")


def load_fairface(checkpoint: str | None) -> torch.nn.Module:
    """torchvision's ResNet-34 with an 18-logit head, weights from `checkpoint` (.pt state dict,
    read with weights_only, or .safetensors)."""
    _check_checkpoint(checkpoint)
    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, len(FAIRFACE_LABELS))
    if checkpoint.endswith(".safetensors"):
        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{checkpoint} is not a FairFace ResNet-34 (18 logits): "
                         f"{error}") from error
    return model
