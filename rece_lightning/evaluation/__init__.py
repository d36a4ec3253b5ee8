"""Evaluation of erased models: a generation stage (fingerprinted image sets), metrics in a registry, the Lightning
evaluator and its reports."""

from rece_lightning.evaluation.metrics import EvaluationMetric, metric_names, register_metric
from rece_lightning.evaluation.module import ErasureEvaluator
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, TABLE1_CLASSES, NudityScorer

__all__ = [
    "EXPOSED_CLASSES",
    "TABLE1_CLASSES",
    "ErasureEvaluator",
    "EvaluationMetric",
    "NudityScorer",
    "metric_names",
    "register_metric",
]
