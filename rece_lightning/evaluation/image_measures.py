"""torchmetrics for the paper's tables, with the feature extractors configurable.

The defaults are the real ones: CLIP ViT-L/14 for the CLIP score, Inception-v3 (torch-fidelity) for FID, AlexNet
LPIPS. Where those weights cannot be had (offline machines, tests), a local CLIP folder, an ``nn.Module`` feature
extractor for FID, and an ``nn.Module`` backbone for LPIPS go through the same options.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric


class _ProjectedCLIP(nn.Module):
    """transformers 5's ``CLIPModel.get_*_features`` return a model output whose ``pooler_output`` holds the projected
    features; torchmetrics 1.9's CLIPScore expects the tensor itself (it fails with "has no attribute 'norm'")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> Tensor:
        return output if isinstance(output, Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(clip_model: str) -> Metric:
    """``CLIPScore`` from a hub id (``openai/clip-vit-large-patch14``) or a local ``save_pretrained`` folder."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    name = str(Path(clip_model).expanduser()) if Path(clip_model).expanduser().is_dir() else clip_model

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return _ProjectedCLIP(CLIPModel.from_pretrained(name).eval()), CLIPProcessor.from_pretrained(name)

    return CLIPScore(model_name_or_path=load)


def frechet_inception_distance(feature: int | nn.Module, weights_path: str | None = None) -> Metric:
    """``FrechetInceptionDistance`` on uint8 images: Inception-v3 features (64/192/768/2048) or a given module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"fid_weights_path={weights_path!r} does not exist")
    kwargs = {"feature_extractor_weights_path": weights_path} if weights_path else {}
    return FrechetInceptionDistance(feature=feature, reset_real_features=True, **kwargs)


class BackboneLPIPS(Metric):
    """The LPIPS distance (Zhang et al., 2018) over a given backbone's feature maps, layers weighted equally.

    Per layer: unit-normalise each position's channel vector, square the difference, average over positions; sum
    over layers. With AlexNet and LPIPS's learned layer weights this is the published metric (use
    ``lpips_net="alex"``); with another backbone and equal weights it is the same construction on other features.
    ``backbone`` maps (N, 3, H, W) images in [-1, 1] to a list of (N, C_l, H_l, W_l) feature maps.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, backbone: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone.eval().requires_grad_(False)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, first: Tensor, second: Tensor) -> None:
        """``first``, ``second``: (N, 3, H, W) images in [0, 1]."""
        features_a = self.backbone(first * 2 - 1)
        features_b = self.backbone(second * 2 - 1)
        distance = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
        for a, b in zip(features_a, features_b, strict=True):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            distance += ((a - b) ** 2).sum(dim=1).mean(dim=(1, 2)).double()
        self.total += distance.sum()
        self.count += first.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class PairedLPIPS(Metric):
    """Mean LPIPS between paired images, from torchmetrics' LPIPS (``alex``/``vgg``/``squeeze``) or a backbone."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, net: str | nn.Module = "alex", **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(net, nn.Module):
            self.inner = BackboneLPIPS(net)
        else:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            if net not in ("alex", "vgg", "squeeze"):
                raise ValueError(f"lpips_net={net!r} is not allowed: 'alex', 'vgg', 'squeeze' or an nn.Module")
            self.inner = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="sum", normalize=True)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, first: Tensor, second: Tensor) -> None:
        """``first``, ``second``: (N, 3, H, W) float images in [0, 1]."""
        if isinstance(self.inner, BackboneLPIPS):
            self.inner.reset()
            self.inner.update(first, second)
            self.total += self.inner.total
        else:
            self.total += self.inner(first, second).double()
        self.count += first.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


def as_float_images(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
