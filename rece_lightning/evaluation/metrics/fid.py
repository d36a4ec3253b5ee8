"""FID of the erased model's images against the original model's, same prompts and seeds (Table 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.aggregation import SumMetric

from rece_lightning.data import PromptItem
from rece_lightning.evaluation import image_measures
from rece_lightning.evaluation.metrics.base import (
    COMPARISON,
    MetricOptions,
    Paired,
    device_of,
    nchw_uint8,
    register_metric,
    same_size_groups,
)


@register_metric("fid")
class ErasedVsOriginalFID(Paired):
    """FID of the erased model's images (fake) against the original model's (real)."""

    keys = ("fid",)

    def __init__(self, feature: int | nn.Module = 2048, weights_path: str | None = None) -> None:
        super().__init__()
        self.fid = image_measures.frechet_inception_distance(feature, weights_path)
        self.pairs = SumMetric()

    @classmethod
    def from_options(cls, options: MetricOptions) -> ErasedVsOriginalFID:
        return cls(options.fid_feature, options.fid_weights_path)

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        for indices, original in same_size_groups(images["original"]):
            erased = np.stack([images["erased"][i] for i in indices])
            self.fid.update(nchw_uint8(original, device_of(self.fid)), real=True)
            self.fid.update(nchw_uint8(erased, device_of(self.fid)), real=False)
            self.pairs.update(float(len(indices)))

    def compute(self) -> dict[str, dict[str, Any]]:
        if not hasattr(self.fid, "orig_dtype"):  # set by the first update; a process without prompts had none
            self.fid.orig_dtype = torch.float32
        enough = int(self.pairs.compute()) >= 2
        return {COMPARISON: {"fid": float(self.fid.compute()) if enough else float("nan")}}
