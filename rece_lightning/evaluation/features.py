"""Small offline feature extractors for FID and LPIPS where Inception / AlexNet weights cannot be had.

``RandomConvFeatures`` is a seeded random convolutional network (random features are a known stand-in for learned
ones in kernel and FID-style distances). FID and LPIPS over it are consistent within a run, and they do rise as
images move apart, but they are not comparable with published numbers: use the real extractors for the paper's
tables.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RandomConvFeatures(nn.Module):
    """A seeded random 3-stage CNN. ``forward`` returns the list of stage outputs (LPIPS backbone); for FID, called
    on uint8 images, it returns pooled ``num_features``-dimensional vectors."""

    def __init__(self, seed: int = 0, channels: int = 16, for_fid: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = [3, channels, 2 * channels, 4 * channels]
        self.stages = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            conv = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (3 * cin) ** 0.5)
                conv.bias.zero_()
            self.stages.append(nn.Sequential(conv, nn.ReLU()))
        self.for_fid = for_fid
        self.num_features = widths[-1]
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> Tensor | list[Tensor]:
        if self.for_fid:  # torchmetrics' FID passes uint8 (N, 3, H, W)
            images = images.float() / 127.5 - 1.0
        outputs = []
        features = images.float()
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        if self.for_fid:
            return features.mean(dim=(2, 3)).double()
        return outputs
