"""The paper's metrics, one file each, found by name (``metrics: [nudity, asr, ...]``) or given as instances:

* ``nudity``: NudeNet per-class image counts at 0.6 over Table 1's eight classes, their total, the nude-image rate;
* ``asr``: attack success rate (Table 4): the share of *prompts* with any image showing an exposed class at 0.45;
* ``concept_asr``: the same by any other detector (``scorer``);
* ``concept``: per-class counts and rate by any other detector, e.g. the toy world's colours;
* ``clip``: CLIP score of each image against its prompt (Table 1);
* ``fid``: FID of the erased model's images against the original model's, same prompts and seeds (Table 1);
* ``lpips``: LPIPS between erased and original images (Table 3's LPIPS_e / _u / _d with ``erased_artist``);
* ``object``: an image classifier's top-1 accuracy on the erased object class and on the others (the appendix).
"""

from rece_lightning.evaluation.metrics.asr import AttackSuccessRate
from rece_lightning.evaluation.metrics.base import (
    COMPARISON,
    CachedDetections,
    EvaluationMetric,
    MetricOptions,
    metric_class,
    metric_names,
    register_metric,
)
from rece_lightning.evaluation.metrics.clip import ClipScore
from rece_lightning.evaluation.metrics.concept import ConceptCounts
from rece_lightning.evaluation.metrics.concept_asr import ConceptAttackSuccessRate
from rece_lightning.evaluation.metrics.fid import ErasedVsOriginalFID
from rece_lightning.evaluation.metrics.lpips import ErasedVsOriginalLPIPS
from rece_lightning.evaluation.metrics.nudity import NudityCounts
from rece_lightning.evaluation.metrics.objects import ObjectAccuracy

__all__ = [
    "COMPARISON",
    "AttackSuccessRate",
    "CachedDetections",
    "ClipScore",
    "ConceptAttackSuccessRate",
    "ConceptCounts",
    "ErasedVsOriginalFID",
    "ErasedVsOriginalLPIPS",
    "EvaluationMetric",
    "MetricOptions",
    "NudityCounts",
    "ObjectAccuracy",
    "metric_class",
    "metric_names",
    "register_metric",
]
