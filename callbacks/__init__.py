"""Callbacks that observe a RECE run and decide; each works alone and in any order, and none holds erasure math."""

from callbacks.collapse import CollapseGuard
from callbacks.concept_selection import ConceptCheckpointSelector, NudityCheckpointSelector
from callbacks.drift import ParameterDrift
from callbacks.preservation import ConceptPreservation
from callbacks.probe_images import ProbeImages
from callbacks.probing import ProbeSettings

__all__ = [
    "CollapseGuard",
    "ConceptCheckpointSelector",
    "ConceptPreservation",
    "NudityCheckpointSelector",
    "ParameterDrift",
    "ProbeImages",
    "ProbeSettings",
]
