"""The toy world: one coloured shape on a plain background, 32x32, with exact ground truth.

A caption names the shape and may name its colour and size. A named attribute is drawn
uniformly; an attribute the caption leaves out is drawn from a *biased prior per shape* (circles
are mostly red, squares mostly small, ...). "a circle" therefore forces an implicit colour and
size choice whose bias is known exactly, and the `oracle` reads every attribute back from the
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (236, 236, 236)
SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 200, 30),
}
SIZES = {"small": 5.0, "large": 10.0}  # half-extent in pixels, before jitter
PREFIXES = ("a", "a picture of a", "a drawing of a")

# The implicit choices: what an unnamed attribute defaults to, per shape.
COLOR_PRIOR = {
    "circle": {"red": 0.7, "green": 0.1, "blue": 0.1, "yellow": 0.1},
    "square": {"red": 0.1, "green": 0.1, "blue": 0.7, "yellow": 0.1},
    "triangle": {"red": 0.1, "green": 0.6, "blue": 0.1, "yellow": 0.2},
}
SIZE_PRIOR = {
    "circle": {"small": 0.2, "large": 0.8},
    "square": {"small": 0.8, "large": 0.2},
    "triangle": {"small": 0.3, "large": 0.7},
}
P_NAMED = 0.5  # chance that a caption names the colour (and, independently, the size)

_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges like a real renderer's


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    caption: str
    color_named: bool
    size_named: bool


def caption(shape: str, color: str | None = None, size: str | None = None,
            prefix: str = PREFIXES[0]) -> str:
    """'a small red circle'; an attribute passed as None is left out."""
    return " ".join(w for w in (prefix, size, color, shape) if w)


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """`n` captioned scenes: named attributes uniform, unnamed ones from the biased priors."""
    scenes = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color_named, size_named = rng.random(2) < P_NAMED
        color = _draw(rng, COLORS, None if color_named else COLOR_PRIOR[shape])
        size = _draw(rng, SIZES, None if size_named else SIZE_PRIOR[shape])
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
        text = caption(shape, color if color_named else None, size if size_named else None, prefix)
        scenes.append(Scene(shape, color, size, text, bool(color_named), bool(size_named)))
    return scenes


def _draw(rng: np.random.Generator, names: dict, prior: dict[str, float] | None) -> str:
    keys = list(names)
    p = None if prior is None else np.array([prior[k] for k in keys])
    return keys[rng.choice(len(keys), p=p)]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene as a 32x32 RGB image, with jitter in position, extent and colour."""
    s = _SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    half = SIZES[scene.size] + rng.uniform(-1.0, 1.0)
    room = IMAGE_SIZE / 2 - half - 2
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-room, room, size=2) * 0.5
    color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[scene.color])
    box = [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s]
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse(box, fill=color)
    elif scene.shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])],
                     fill=color)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`n` rendered scenes: uint8 images `[n, 32, 32, 3]` and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    images = np.stack([np.asarray(render(scene, rng)) for scene in scenes])
    return images, scenes


# --- the oracle -----------------------------------------------------------------------------

_OBJECT_THRESHOLD = 60.0  # L2 distance in RGB from the background that marks an object pixel
_MIN_PIXELS = 8
_LARGE_EXTENT = 14.5  # bounding-box side in pixels between small (~10) and large (~20)


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no object found
    color: str | None
    size: str | None


def oracle(image: Image.Image | np.ndarray) -> Reading:
    """Shape, colour and size read straight from the pixels.

    Object pixels are those far from the background colour; the colour is the palette entry
    nearest their median; the size is the bounding box's longer side; the shape is how much of
    the box the object fills (square ~1, circle ~pi/4, triangle ~1/2).
    """
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    mask = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > _OBJECT_THRESHOLD
    if mask.sum() < _MIN_PIXELS:
        return Reading(None, None, None)
    rows, cols = np.nonzero(mask)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    median = np.median(pixels[mask], axis=0)
    palette = np.array(list(COLORS.values()), np.float32)
    color = list(COLORS)[int(np.linalg.norm(palette - median, axis=1).argmin())]
    size = "large" if extent >= _LARGE_EXTENT else "small"
    return Reading(shape, color, size)
