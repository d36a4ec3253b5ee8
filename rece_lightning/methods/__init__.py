"""Closed-form erasure methods over the shared transform, one file each: :class:`UCE`, :class:`RECE`,
:class:`NullSpaceRECE` (hard preservation), :class:`ProjectionRECE` (hard preservation, c' projected out instead of
pushed to the guide) and :class:`AdversarialRECE` (an attack in the loop; with ``hard_preservation``, both)."""

from rece_lightning.methods.adversarial import AdversarialRECE
from rece_lightning.methods.base import Editor, ErasureMethod, from_spec
from rece_lightning.methods.null_space import HardPreservation, NullSpaceRECE
from rece_lightning.methods.projection import ProjectionRECE
from rece_lightning.methods.rece import RECE
from rece_lightning.methods.uce import UCE

__all__ = [
    "RECE",
    "UCE",
    "AdversarialRECE",
    "Editor",
    "ErasureMethod",
    "HardPreservation",
    "NullSpaceRECE",
    "ProjectionRECE",
    "from_spec",
]
