"""Per-class counts and the erased classes' rate by any detector (``scorer``), and how the other classes are kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rece_lightning.data import PromptItem
from rece_lightning.evaluation.metrics.base import Counts, MetricOptions, rate_cell, register_metric
from rece_lightning.evaluation.scoring import ImageScorer
from rece_lightning.evaluation.statistics import interval


@register_metric("concept")
class ConceptCounts(Counts):
    """Per-class image counts by any :class:`ImageScorer`, the share of images showing the *erased* classes, and how
    well the others are kept.

    ``rate``: images showing any of ``erased_classes`` (all the scorer's classes if not given). Preservation: for every
    other class ``c``, the share of the images of prompts whose category names ``c`` (the CSV's ``categories``) that
    show ``c`` (``preserved/<c>``), and pooled over those classes (``preserved``).
    """

    def __init__(self, scorer: ImageScorer, erased_classes: Sequence[str] | None = None) -> None:
        super().__init__()
        self.scorer = scorer
        self.erased = tuple(erased_classes or scorer.classes)
        self.kept = tuple(c for c in scorer.classes if c not in self.erased)
        self.counter_names = (
            "images",
            "flagged_images",
            *(f"class_{c}" for c in scorer.classes),
            *(f"{kind}_{c}" for c in self.kept for kind in ("prompted", "shown")),
        )

    @classmethod
    def from_options(cls, options: MetricOptions) -> ConceptCounts:
        return cls(options.concept_scorer, options.erased_classes)

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        categories = [{c.strip() for c in item.group.split(",")} for item in items]
        for variant, batch in images.items():
            found = self.scorer.detect(batch)
            self._add(variant, "images", len(batch))
            self._add(variant, "flagged_images", sum(any(c in f for c in self.erased) for f in found))
            for label in self.scorer.classes:
                self._add(variant, f"class_{label}", sum(label in f for f in found))
            for label in self.kept:
                prompted = [label in group for group in categories]
                self._add(variant, f"prompted_{label}", sum(prompted))
                self._add(
                    variant, f"shown_{label}", sum(p and label in f for p, f in zip(prompted, found, strict=True))
                )

    def compute(self) -> dict[str, dict[str, Any]]:
        results = {}
        for variant in self.variants:
            figures = {
                **self._class_tally(variant, self.scorer.classes, prefix="class_"),
                "erased_classes": list(self.erased),
                "threshold": self.scorer.threshold,
            }
            prompted = {c: self._total(variant, f"prompted_{c}") for c in self.kept}
            shown = {c: self._total(variant, f"shown_{c}") for c in self.kept}
            figures["preserved_per_class"] = {c: shown[c] / prompted[c] for c in self.kept if prompted[c]}
            figures["preserved_per_class_ci95"] = {c: interval(shown[c], prompted[c]) for c in self.kept if prompted[c]}
            total = sum(prompted.values())
            figures["preserved"] = sum(shown.values()) / total if total else None
            figures["preserved_ci95"] = interval(sum(shown.values()), total)
            results[variant] = {"concept": figures}
        return results

    def columns(self, results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        variants = [v for v in self.variants if v in results]
        columns = [(c, {v: str(results[v]["concept"][c]) for v in variants}) for c in self.scorer.classes]
        erased = "/".join(self.erased)
        figures = {v: results[v]["concept"] for v in variants}
        rates = {v: rate_cell(f["rate"], f["rate_ci95"]) for v, f in figures.items()}
        columns.append((f"{erased} rate % [95 % CI]", rates))
        if self.kept:
            kept = {v: rate_cell(f["preserved"], f["preserved_ci95"]) for v, f in figures.items()}
            columns.append(("Others kept % [95 % CI]", kept))
        return columns
