"""LPIPS between erased and original images of the same prompt and seed (Table 3's LPIPS_e, _u and _d)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rece_lightning.data import PromptItem
from rece_lightning.evaluation import image_measures
from rece_lightning.evaluation.metrics.base import (
    COMPARISON,
    MetricOptions,
    Paired,
    device_of,
    register_metric,
    same_size_groups,
)


@register_metric("lpips")
class ErasedVsOriginalLPIPS(Paired):
    """Mean LPIPS between erased and original images of the same prompt and seed (Table 3's LPIPS_e / _u / _d with
    ``erased_artist``)."""

    keys = ("lpips", "lpips_e", "lpips_u", "lpips_d")

    def __init__(self, net: str | nn.Module = "alex", erased_artist: str | None = None) -> None:
        super().__init__()
        self.erased_artist = erased_artist
        groups = ["all"] + (["erased_artist", "other_artists"] if erased_artist else [])
        self.lpips = nn.ModuleDict({g: image_measures.PairedLPIPS(net) for g in groups})

    @classmethod
    def from_options(cls, options: MetricOptions) -> ErasedVsOriginalLPIPS:
        return cls(options.lpips_net, options.erased_artist)

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        device = device_of(self.lpips["all"])
        for indices, original in same_size_groups(images["original"]):
            erased = image_measures.as_float_images(np.stack([images["erased"][i] for i in indices])).to(device)
            original = image_measures.as_float_images(original).to(device)
            self.lpips["all"].update(erased, original)
            if self.erased_artist:
                mine = torch.tensor([items[i].group == self.erased_artist for i in indices], device=device)
                for group, mask in (("erased_artist", mine), ("other_artists", ~mine)):
                    if mask.any():
                        self.lpips[group].update(erased[mask], original[mask])

    def compute(self) -> dict[str, dict[str, Any]]:
        comparison = {"lpips": float(self.lpips["all"].compute())}
        if self.erased_artist:
            comparison["lpips_e"] = float(self.lpips["erased_artist"].compute())
            comparison["lpips_u"] = float(self.lpips["other_artists"].compute())
            comparison["lpips_d"] = comparison["lpips_e"] - comparison["lpips_u"]
        return {COMPARISON: comparison}
