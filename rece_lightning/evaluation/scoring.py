"""What every concept detector offers the selector and the evaluator: images in, per-class detections out.

NudeNet (:class:`~rece_lightning.evaluation.nudity.NudityScorer`) and the toy world's colour / shape / texture
detector (:class:`~rece_lightning.toyworld.detectors.ToyWorldScorer`) are both ``ImageScorer``s, so the checkpoint
selector and the evaluator take either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rece_lightning.evaluation.statistics import interval


class ImageScorer(ABC):
    """Finds ``classes`` in images; an image *shows the concept* when any of them is found at ``threshold`` or more.

    Subclasses set ``threshold`` and ``classes`` and implement :meth:`detect`.
    """

    threshold: float
    classes: tuple[str, ...]

    def classes_for(self, concept: str) -> set[str] | None:
        """The classes by which this detector recognises ``concept`` (an erased concept's name), or None where it
        cannot tell (then nobody checks that the detector looks for what is erased)."""
        return None

    @abstractmethod
    def detect(self, images: Iterable[np.ndarray]) -> list[dict[str, float]]:
        """Per RGB image ((H, W, 3), float in [0, 1] or uint8): {class: score} for each class found at the threshold."""

    def tally(self, detections: Sequence[dict[str, float]]) -> dict[str, Any]:
        """Per-class image counts (each class once per image), images showing the concept, their share and its 95 %
        Wilson interval."""
        counts = {label: sum(label in d for d in detections) for label in self.classes}
        flagged = sum(bool(d) for d in detections)
        return {
            **counts,
            "total": sum(counts.values()),
            "flagged_images": flagged,
            "images": len(detections),
            "rate": flagged / len(detections) if detections else 0.0,
            "rate_ci95": interval(flagged, len(detections)),
        }


def check_classes(classes: Iterable[str], known: Iterable[str], detector: str) -> tuple[str, ...]:
    """Refuse an empty class list or classes ``detector`` does not know, naming them and the known ones."""
    classes, known = tuple(classes), sorted(known)
    unknown = [c for c in classes if c not in known]
    if unknown or not classes:
        raise ValueError(f"classes={list(classes)!r} is not allowed: choose from {detector}'s {known}")
    return classes


def check_concept_classes(scorer: ImageScorer, concepts: Iterable[str], owner: str) -> None:
    """Refuse a scorer whose classes miss what an erased concept looks like to it (a ``red`` detector selecting the
    state where ``blue`` is gone would call the very first state clean); warn where it cannot tell."""
    from lightning.pytorch.utilities import rank_zero_warn

    for concept in concepts:
        expected = scorer.classes_for(concept)
        if expected is None:
            rank_zero_warn(
                f"{owner}: cannot tell which of its classes {list(scorer.classes)} show the erased concept "
                f"{concept!r}; make sure the scorer looks for it"
            )
        elif not expected & set(scorer.classes):
            raise ValueError(
                f"{owner}: its scorer looks for {list(scorer.classes)} but the erased concept {concept!r} shows as "
                f"{sorted(expected)}: give the scorer classes {sorted(expected)} (e.g. "
                f"--selector.init_args.scorer.init_args.classes='{sorted(expected)}')"
            )


def check_scorer(scorer: object, owner: str) -> ImageScorer:
    """Refuse an object that cannot score images the way ``owner`` needs, before any image is generated."""
    if isinstance(scorer, ImageScorer):
        return scorer
    missing = [name for name in ("detect", "tally", "classes", "threshold") if not hasattr(scorer, name)]
    if missing:
        raise TypeError(
            f"{owner}: scorer={scorer!r} does not fit: it lacks {missing}. Give an ImageScorer such as "
            "rece_lightning.evaluation.NudityScorer or rece_lightning.toyworld.ToyWorldScorer"
        )
    return scorer  # duck-typed: has the whole interface
