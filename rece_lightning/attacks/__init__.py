"""Red-team attacks as prompt sources of the evaluation (``ErasureEvaluator(attack=...)``): Table 4's robustness."""

from rece_lightning.attacks.base import AttackContext, AttackOutcome, PromptAttack
from rece_lightning.attacks.derived_embedding import DerivedEmbeddingAttack
from rece_lightning.attacks.ring_a_bell import RingABellAttack
from rece_lightning.attacks.unlearndiff import UnlearnDiffAttack

__all__ = [
    "AttackContext",
    "AttackOutcome",
    "DerivedEmbeddingAttack",
    "PromptAttack",
    "RingABellAttack",
    "UnlearnDiffAttack",
]
