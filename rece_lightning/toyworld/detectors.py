"""Detectors for the toy world's concepts: colour by pixel statistics, shape and texture by geometry.

They play NudeNet's part on the toy model: :class:`ToyWorldScorer` is an
:class:`~rece_lightning.evaluation.scoring.ImageScorer`, so the checkpoint selector and the evaluator take it in
NudeNet's place. :func:`predict` gives the full labels of an image (for accuracy figures).

* Foreground: pixels far from the background's grey (estimated from the image border).
* Colour: each saturated foreground pixel votes for the colour whose hue is nearest its own; a colour's score is its
  share of the votes. An object with few saturated pixels is grey (the world's unnamed colour).
* Shape: the largest foreground blob against each shape drawn in the blob's bounding box; the best overlap (IoU) wins.
* Texture: the contrast between the object's dark and light rows (striped), and within its rows (checkered).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rece_lightning.evaluation.nudity import to_uint8
from rece_lightning.evaluation.scoring import ImageScorer, check_classes
from rece_lightning.toyworld.world import COLOURS, HUES, NEUTRAL, OBJECT_COLOURS, SHAPES, TEXTURES, shape_mask

CLASSES: tuple[str, ...] = (*OBJECT_COLOURS, *SHAPES, *TEXTURES)
MIN_FOREGROUND = 0.015  # below this share of the image there is no object to label
FOREGROUND_DISTANCE = 45  # max per-channel distance (0..255) from the background that makes a pixel foreground
MIN_SATURATION = 0.35  # pixels less saturated than this vote for no colour
NEUTRAL_BELOW = 0.25  # an object with fewer saturated pixels than this share of its own is grey
TEXTURED_FROM = 0.3  # contrast between dark and light rows (striped) or within rows (checkered) from which it counts


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
    centres = np.array([HUES[c] for c in COLOURS])
    distance = np.abs(hue[voters][:, None] - centres[None, :])
    nearest = np.argmin(np.minimum(distance, 360.0 - distance), axis=1)
    counts = np.bincount(nearest, minlength=len(centres))
    shares = {colour: float(counts[i]) / total if total else 0.0 for i, colour in enumerate(COLOURS)}
    return shares, total / max(int(foreground.sum()), 1)


def _largest_blob(foreground: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)
    if count <= 1:
        return foreground
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def _shape(blob: np.ndarray) -> str:
    """The shape whose mask, drawn in the blob's bounding box, overlaps the blob best."""
    rows = np.flatnonzero(blob.any(axis=1))
    cols = np.flatnonzero(blob.any(axis=0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    half = (rows[-1] - rows[0] + cols[-1] - cols[0] + 2) / 4
    y, x = np.mgrid[0 : blob.shape[0], 0 : blob.shape[1]] + 0.5
    overlaps = {}
    for shape in SHAPES:
        mask = shape_mask(shape, x, y, cx, cy, half)
        overlaps[shape] = (mask & blob).sum() / max((mask | blob).sum(), 1)
    return max(overlaps, key=overlaps.get)


def _contrast(values: np.ndarray) -> float:
    return float(1.0 - np.percentile(values, 10) / max(np.percentile(values, 90), 1.0))


def _texture(image: np.ndarray, blob: np.ndarray) -> str:
    """Stripes are horizontal: contrast between the object's darkest and lightest rows (striped ~0.5, plain ~0);
    checks alternate along each row too: the median contrast within a row (checkered ~0.5, striped and plain ~0)."""
    inner = cv2.erode(blob.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # edges blend into the background
    if inner.sum() < 8:
        inner = blob
    brightness = image.max(axis=-1).astype(np.float32)
    lines = [brightness[r][inner[r]] for r in range(inner.shape[0]) if inner[r].sum() >= 2]
    if not lines:
        return "plain"
    between = _contrast(np.array([line.mean() for line in lines]))
    wide = [line for line in lines if line.size >= 6]
    within = float(np.median([_contrast(line) for line in wide])) if wide else 0.0
    if within >= TEXTURED_FROM:
        return "checkered"
    return "striped" if between >= TEXTURED_FROM else "plain"


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
    return Prediction(colour, _shape(blob), _texture(pixels, blob), shares, share)


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
