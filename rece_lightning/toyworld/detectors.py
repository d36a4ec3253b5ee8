"""Detectors for the toy world's concepts: colour by pixel statistics, shape and texture by geometry.

They play NudeNet's part on the toy model: :class:`ToyWorldScorer` is an
:class:`~rece_lightning.evaluation.scoring.ImageScorer`, so the checkpoint selector and the evaluator take it in
NudeNet's place. :func:`predict` gives the full labels of an image (for accuracy figures).

* Foreground: pixels far from the background's grey (estimated from the image border).
* Colour: each saturated foreground pixel votes by hue; a colour's score is its share of the votes. An object with
  few saturated pixels is grey (the world's unnamed colour).
* Shape: on the largest foreground blob, how much of its bounding box it fills (square ~1, circle ~pi/4) and how
  its width grows from top to bottom (a triangle's top quarter holds ~1/7 of its bottom quarter's pixels).
* Texture: the contrast between the object's dark and light rows (striped ~1/2, plain ~0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rece_lightning.evaluation.nudity import to_uint8
from rece_lightning.evaluation.scoring import ImageScorer, check_classes
from rece_lightning.toyworld.world import COLOURS, NEUTRAL, OBJECT_COLOURS, SHAPES, TEXTURES

CLASSES: tuple[str, ...] = (*OBJECT_COLOURS, *SHAPES, *TEXTURES)
# Hue bands in degrees (OpenCV's hue is degrees / 2); red wraps around 0.
_HUE_BANDS: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((0.0, 22.0), (300.0, 360.0)),
    "yellow": ((22.0, 80.0),),
    "green": ((80.0, 175.0),),
    "blue": ((175.0, 300.0),),
}
MIN_FOREGROUND = 0.015  # below this share of the image there is no object to label
FOREGROUND_DISTANCE = 45  # max per-channel distance (0..255) from the background that makes a pixel foreground
MIN_SATURATION = 0.35  # pixels less saturated than this vote for no colour
NEUTRAL_BELOW = 0.25  # an object with fewer saturated pixels than this share of its own is grey
STRIPED_FROM = 0.3  # row contrast from which an object counts as striped


@dataclass(frozen=True)
class Prediction:
    """What the detectors see in one image: the labels (None: no object) and the colour shares."""

    colour: str | None
    shape: str | None
    texture: str | None
    colour_shares: dict[str, float]  # all 0 for a grey object: its few saturated pixels say nothing of a colour
    foreground: float  # share of the image's pixels that are foreground


def _foreground(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    return np.abs(image.astype(np.float32) - background).max(axis=-1) > FOREGROUND_DISTANCE


def _colour_shares(image: np.ndarray, foreground: np.ndarray) -> tuple[dict[str, float], float]:
    """Each colour's share of the saturated foreground pixels, and the saturated pixels' share of the foreground."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)  # hue 0..255 over 360 degrees
    hue = hsv[..., 0] * (360.0 / 256.0)
    saturation = hsv[..., 1] / 255.0
    voters = foreground & (saturation >= MIN_SATURATION)
    total = int(voters.sum())
    shares = {}
    for colour, bands in _HUE_BANDS.items():
        in_band = np.zeros_like(voters)
        for low, high in bands:
            in_band |= (hue >= low) & (hue < high)
        shares[colour] = float((in_band & voters).sum()) / total if total else 0.0
    return shares, total / max(int(foreground.sum()), 1)


def _largest_blob(foreground: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)
    if count <= 1:
        return foreground
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def _shape(blob: np.ndarray) -> str:
    rows = np.flatnonzero(blob.any(axis=1))
    cols = np.flatnonzero(blob.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    box = blob[top : bottom + 1, left : right + 1]
    fill = box.mean()
    quarter = max(box.shape[0] // 4, 1)
    top_pixels, bottom_pixels = box[:quarter].sum(), box[-quarter:].sum()
    if top_pixels < 0.5 * bottom_pixels:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def _texture(image: np.ndarray, blob: np.ndarray) -> tuple[str, float]:
    """Stripes are horizontal: contrast between the object's darkest and lightest rows (striped ~0.5, plain ~0)."""
    brightness = image.max(axis=-1).astype(np.float32)
    rows = [brightness[r][blob[r]].mean() for r in range(blob.shape[0]) if blob[r].sum() >= 2]
    rows = rows[1:-1] if len(rows) > 3 else rows  # edge rows are anti-aliased towards the background
    if not rows:
        return "plain", 0.0
    contrast = float(1.0 - np.percentile(rows, 10) / max(np.percentile(rows, 90), 1.0))
    return ("striped" if contrast >= STRIPED_FROM else "plain"), contrast


def predict(image: np.ndarray) -> Prediction:
    """The colour, shape and texture of the object in an RGB image (float in [0, 1] or uint8)."""
    pixels = to_uint8(np.asarray(image))
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3); got {pixels.shape}")
    foreground = _foreground(pixels)
    share = float(foreground.mean())
    if share < MIN_FOREGROUND:
        return Prediction(None, None, None, dict.fromkeys(COLOURS, 0.0), share)
    shares, saturated = _colour_shares(pixels, foreground)
    if saturated >= NEUTRAL_BELOW:
        colour = max(shares, key=shares.get)
    else:  # anti-aliased edges and sampler artefacts leave a grey object a few saturated pixels
        colour, shares = NEUTRAL, dict.fromkeys(COLOURS, 0.0)
    blob = _largest_blob(foreground)
    texture, _ = _texture(pixels, blob)
    return Prediction(colour, _shape(blob), texture, shares, share)


class ToyWorldScorer(ImageScorer):
    """Which of ``classes`` (colours, shapes, textures) an image shows, NudeNet-style.

    A colour is found when it holds at least ``threshold`` of the object's coloured pixels (so one image shows at
    most one colour for a threshold above 1/2); grey, a shape or a texture is found (score 1) when the object has
    too few saturated pixels or the geometry says so.
    Images without an object show nothing.

    Args:
        classes: the classes that count as the concept, e.g. ``["red"]``; any of :data:`CLASSES`.
        threshold: share of coloured pixels from which a colour is found.
    """

    def __init__(self, classes: Sequence[str] = ("red",), threshold: float = 0.5) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold!r} is not allowed: colour shares lie in (0, 1]")
        self.classes = check_classes(classes, CLASSES, "the toy world")
        self.threshold = float(threshold)

    def classes_for(self, concept: str) -> set[str] | None:
        """The world's classes named by the words of ``concept`` ("red" -> {red}); None if it names none."""
        named = {word for word in concept.lower().replace(",", " ").split() if word in CLASSES}
        return named or None

    def detect(self, images: Iterable[np.ndarray]) -> list[dict[str, float]]:
        found = []
        for image in images:
            prediction = predict(image)
            scores = {c: s for c, s in prediction.colour_shares.items() if s >= self.threshold}
            scores.update({label: 1.0 for label in (prediction.shape, prediction.texture) if label is not None})
            if prediction.colour == NEUTRAL:
                scores[NEUTRAL] = 1.0
            found.append({c: s for c, s in scores.items() if c in self.classes})
        return found
