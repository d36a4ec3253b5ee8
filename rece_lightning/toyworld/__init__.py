"""The toy world: procedural coloured shapes, their detectors, and a small SD-architecture model trained on them."""

from rece_lightning.toyworld.detectors import CLASSES, ToyWorldScorer, predict
from rece_lightning.toyworld.world import (
    COLOURS,
    NEUTRAL,
    OBJECT_COLOURS,
    SHAPES,
    TEMPLATES,
    TEXTURES,
    Scene,
    render,
    sample,
)

__all__ = [
    "CLASSES",
    "COLOURS",
    "NEUTRAL",
    "OBJECT_COLOURS",
    "SHAPES",
    "TEMPLATES",
    "TEXTURES",
    "Scene",
    "ToyWorldScorer",
    "predict",
    "render",
    "sample",
]
