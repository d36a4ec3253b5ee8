"""CLIP score of each image against its own prompt (Table 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from rece_lightning.data import PromptItem
from rece_lightning.evaluation import image_measures
from rece_lightning.evaluation.metrics.base import (
    EvaluationMetric,
    MetricOptions,
    cell,
    device_of,
    nchw_uint8,
    register_metric,
    same_size_groups,
)


@register_metric("clip")
class ClipScore(EvaluationMetric):
    """CLIP score of each image against its own prompt (torchmetrics' ``CLIPScore``)."""

    def __init__(self, clip_model: str) -> None:
        super().__init__()
        self.clip_model = clip_model

    @classmethod
    def from_options(cls, options: MetricOptions) -> ClipScore:
        return cls(options.clip_model)

    def bind(self, variants: Sequence[str]) -> None:
        self.variants = list(variants)
        self.scores = nn.ModuleDict({v: image_measures.clip_score(self.clip_model) for v in variants})

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        for variant, batch in images.items():
            for indices, stacked in same_size_groups(batch):
                score = self.scores[variant]
                score.update(nchw_uint8(stacked, device_of(score)), [items[i].prompt for i in indices])

    def compute(self) -> dict[str, dict[str, Any]]:
        return {v: {"clip_score": float(self.scores[v].compute())} for v in self.variants}

    def columns(self, results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        return [("CLIP", {v: cell(results[v]["clip_score"]) for v in self.variants if v in results})]
