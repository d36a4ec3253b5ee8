"""A home for evaluation metrics: one class per metric, found by name.

A metric sees every batch of generated images (``update``), gives its figures at the end (``compute``) and says how
they appear in ``results.md`` (``columns``). Its distributed state lives in torchmetrics objects, which the evaluator
holds as sub-modules, so they move to the device and are summed across processes like any torchmetrics state.

A new metric is one class::

    @register_metric("sharpness")
    class Sharpness(EvaluationMetric):
        @classmethod
        def from_evaluator(cls, evaluator):
            return cls(evaluator.variants)
        ...

after which ``metrics: [nudity, sharpness]`` selects it; an instance may also be given directly in ``metrics``
(``class_path`` / ``init_args`` in a config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import nn

from rece_lightning.data import PromptItem

if TYPE_CHECKING:
    from rece_lightning.evaluation.module import ErasureEvaluator

COMPARISON = "erased_vs_original"  # the results entry of metrics that compare the erased model with the original


class EvaluationMetric(nn.Module):
    """One figure of the evaluation (a count, a score, a distance), computed over every process's images.

    Attributes:
        name: the key of its figures in ``results.json`` and of the metric in ``metrics``.
        paired: compares the erased model's images with the original model's (same prompt and seed): needs both.
    """

    name: ClassVar[str]
    paired: ClassVar[bool] = False

    @classmethod
    def from_evaluator(cls, evaluator: ErasureEvaluator) -> EvaluationMetric:
        """The metric built from the evaluator's options (thresholds, feature extractors, the model variants)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built by name: give an instance in `metrics`")

    def bind(self, variants: Sequence[str]) -> None:
        """Called once the evaluator knows which models it evaluates (``original``, ``erased``), before any update."""

    def update(self, items: Sequence[PromptItem], images: dict[str, list[np.ndarray]]) -> None:
        """One batch: ``images[variant][i]`` is the uint8 (H, W, 3) image of ``items[i]``."""
        raise NotImplementedError

    def compute(self) -> dict[str, dict[str, Any]]:
        """Figures per variant (``{"erased": {...}}``) or, for a paired metric, under ``COMPARISON``; merged into
        ``results.json``. Called once, on every process."""
        raise NotImplementedError

    def columns(self, results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        """``(header, {variant: cell})`` for each column this metric adds to ``results.md``."""
        return []


_REGISTRY: dict[str, type[EvaluationMetric]] = {}


def register_metric(name: str) -> Callable[[type[EvaluationMetric]], type[EvaluationMetric]]:
    """Class decorator: make ``name`` select this metric in ``ErasureEvaluator(metrics=[...])``."""

    def register(cls: type[EvaluationMetric]) -> type[EvaluationMetric]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"metric name {name!r} is taken by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def metric_names() -> list[str]:
    """The names ``metrics`` accepts."""
    return list(_REGISTRY)


def metric_class(name: str) -> type[EvaluationMetric]:
    if name not in _REGISTRY:
        raise ValueError(f"metrics: {name!r} is unknown; choose from {metric_names()} or give an EvaluationMetric")
    return _REGISTRY[name]


def same_size_groups(images: Sequence[np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
    """Indices and stacked (N, H, W, 3) arrays of the images that share a size (prompts may ask for their own)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    return [(indices, np.stack([images[i] for i in indices])) for indices in groups.values()]
