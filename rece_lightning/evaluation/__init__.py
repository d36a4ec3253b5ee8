"""Evaluation of erased models: NudeNet scoring, torchmetrics wrappers, the Lightning evaluator and its reports."""

from rece_lightning.evaluation.module import ErasureEvaluator
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, NudityScorer

__all__ = ["EXPOSED_CLASSES", "ErasureEvaluator", "NudityScorer"]
