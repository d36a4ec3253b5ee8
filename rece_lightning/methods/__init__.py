"""Closed-form erasure methods over the shared transform, one file each: :class:`UCE` and :class:`RECE`."""

from rece_lightning.methods.base import Editor, ErasureMethod, from_spec
from rece_lightning.methods.rece import RECE
from rece_lightning.methods.uce import UCE

__all__ = ["RECE", "UCE", "Editor", "ErasureMethod", "from_spec"]
