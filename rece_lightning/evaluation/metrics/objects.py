"""Object erasure (the paper's appendix): top-1 accuracy of an image classifier on the erased class and on the others.

A prompt's class is its CSV ``categories`` cell (``configs/prompts/imagenette.csv``: "a photo of a <class>"); an image
is correct when the classifier's top-1 label names that class. ImageNet labels list synonyms ("church, church
building"): a class matches a label when it equals one of them, case-insensitively. The classifier is any
``transformers`` image-classification model (default ``microsoft/resnet-50``, a local folder offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rece_lightning.data import PromptItem
from rece_lightning.evaluation.metrics.base import Counts, MetricOptions, rate_cell, register_metric
from rece_lightning.evaluation.statistics import interval

IMAGENETTE_CLASSES = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
DEFAULT_CLASSIFIER = "microsoft/resnet-50"

__all__ = ["DEFAULT_CLASSIFIER", "IMAGENETTE_CLASSES", "ObjectAccuracy", "label_index"]


def _names(label: str) -> set[str]:
    return {name.strip().lower() for name in str(label).split(",") if name.strip()}


def label_index(id2label: dict, classes: Sequence[str], classifier: str) -> dict[str, set[int]]:
    """class -> the label ids that name it; refuses, naming them, classes that no label names."""
    index = {c: {int(i) for i, label in id2label.items() if c.strip().lower() in _names(label)} for c in classes}
    missing = [c for c, ids in index.items() if not ids]
    if missing:
        sample = [str(id2label[k]) for k in list(id2label)[:5]]
        raise ValueError(
            f"the classifier {classifier!r} has no label for {missing}: its {len(id2label)} labels are like {sample}; "
            "give classes its labels name (ImageNet's: 'church', 'gas pump', ...), or another classifier"
        )
    return index


def _read_labels(classifier: str) -> dict | None:
    """The classifier's ``id2label`` from its config alone (no weights), or None where it cannot be read here."""
    from transformers import AutoConfig

    try:
        return dict(AutoConfig.from_pretrained(classifier, local_files_only=True).id2label)
    except (OSError, ValueError):
        return None


@register_metric("object")
class ObjectAccuracy(Counts):
    """Top-1 accuracy on the prompts of the erased classes (``erased_accuracy``, lower is better erasure) and on the
    other classes' (``other_accuracy``, what must be kept), each with its 95 % Wilson interval, and per class.

    Args:
        classifier: a ``transformers`` image-classification model (hub id or local folder).
        erased_classes: the erased object classes (default: the evaluation's ``erased_classes``).
        classes: the classes scored (default ImageNette's ten); prompts of other categories are not scored.
        batch_size: images per classifier call.
    """

    def __init__(
        self,
        classifier: str = DEFAULT_CLASSIFIER,
        erased_classes: list[str] | None = None,
        classes: list[str] | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.classes = tuple(classes or IMAGENETTE_CLASSES)
        self.erased = tuple(erased_classes or ())
        strange = [c for c in self.erased if c not in self.classes]
        if strange:
            raise ValueError(f"erased_classes {strange} are not among the scored classes {list(self.classes)}")
        self.batch_size = batch_size
        labels = _read_labels(classifier)  # checked now where the config is here; else once the model loads
        self._index = None if labels is None else label_index(labels, self.classes, classifier)
        self.counter_names = tuple(f"{kind}_{c}" for c in self.classes for kind in ("prompted", "correct"))
        self._model = None

    @classmethod
    def from_options(cls, options: MetricOptions) -> ObjectAccuracy:
        return cls(erased_classes=list(options.erased_classes or ()))

    def _load(self):
        if self._model is None:
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(self.classifier).eval()
            self._processor = AutoImageProcessor.from_pretrained(self.classifier)
            if self._index is None:
                self._index = label_index(dict(model.config.id2label), self.classes, self.classifier)
            self._model = model
        return self._model

    @torch.no_grad()
    def predictions(self, images: Sequence[np.ndarray]) -> list[int]:
        """The classifier's top-1 label id of each uint8 (H, W, 3) image."""
        model = self._load()
        labels = []
        for start in range(0, len(images), self.batch_size):
            batch = self._processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            logits = model(pixel_values=batch["pixel_values"].to(next(model.parameters()).device)).logits
            labels += logits.argmax(-1).tolist()
        return labels

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        scored = [i for i, item in enumerate(items) if item.group.strip() in self.classes]
        if not scored:
            return
        for variant, batch in images.items():
            predicted = self.predictions([batch[i] for i in scored])
            for i, label in zip(scored, predicted, strict=True):
                target = items[i].group.strip()
                self._add(variant, f"prompted_{target}", 1)
                self._add(variant, f"correct_{target}", int(label in self._index[target]))

    def compute(self) -> dict[str, dict[str, Any]]:
        results = {}
        for variant in self.variants:
            prompted = {c: self._total(variant, f"prompted_{c}") for c in self.classes}
            correct = {c: self._total(variant, f"correct_{c}") for c in self.classes}
            figures: dict[str, Any] = {
                "per_class": {c: correct[c] / prompted[c] for c in self.classes if prompted[c]},
                "erased_classes": list(self.erased),
                "classifier": self.classifier,
            }
            for name, chosen in (("erased", self.erased), ("other", [c for c in self.classes if c not in self.erased])):
                shown, total = sum(correct[c] for c in chosen), sum(prompted[c] for c in chosen)
                figures[f"{name}_accuracy"] = shown / total if total else None
                figures[f"{name}_accuracy_ci95"] = interval(shown, total)
            results[variant] = {"object": figures}
        return results

    def columns(self, results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        variants = [v for v in self.variants if v in results]
        figures = {v: results[v]["object"] for v in variants}
        erased = "/".join(self.erased) or "erased"
        return [
            (
                f"{erased} top-1 % [95 % CI]",
                {v: rate_cell(f["erased_accuracy"], f["erased_accuracy_ci95"]) for v, f in figures.items()},
            ),
            (
                "others top-1 % [95 % CI]",
                {v: rate_cell(f["other_accuracy"], f["other_accuracy_ci95"]) for v, f in figures.items()},
            ),
        ]
