"""RECE-P: hard preservation, and a projection instead of a push: each round takes the derived embedding's
directions out of every input (``closed_form.concept_projection``) rather than mapping c' onto the guide (Eq. 3).

Eq. 3's edit is invertible, so the derived-embedding attack (Eq. 8) can always reach the concept's output again
through ``X^-1 c``; each round only makes that input costlier under Eq. 8's reg, and on a wider text encoder than the
shipped toy model's five rounds do not clear c' (README, "Beyond RECE"). A projection
``X = I - H^-1 V (V^T H^-1 V)^-1 V^T`` is not invertible: the K/V energy of c''s current output (the concept's
original one) along the removed directions V is out of every input's reach afterwards. V lies in the null space of the
hard-preserved prompts (``hard_preservation``, as RECE-NS), so their outputs stay the original model's exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from rece_lightning.closed_form import concept_projection
from rece_lightning.data import ConceptSet
from rece_lightning.methods.base import Editor
from rece_lightning.methods.null_space import HardPreservation, NullSpaceRECE
from rece_lightning.validation import check_number


class ProjectionRECE(NullSpaceRECE):
    """UCE confined to the null space, then the concept's directions projected out; each round projects out c''s.

    Args:
        share: each projection removes the fewest directions (inside the null space) that hold this share of the
            K/V energy that removing all of them would put out of reach (0.9: a few directions per concept).
        hard_preservation: what no edit may move (:class:`HardPreservation`, as RECE-NS).
        **rece: RECE's options (``reg`` for c', ``lamb``, ... for the UCE edit).
    """

    name = "RECE-P"

    def __init__(self, share: float = 0.9, hard_preservation: HardPreservation | None = None, **rece: Any) -> None:
        super().__init__(hard_preservation=hard_preservation, **rece)
        self.share = check_number("share", share, strictly_above=0, maximum=1)
        self._removed: list[int] = []  # directions removed by each projection: the initial edit's, then each round's

    def initial_edit(self, editor: Editor, concepts: ConceptSet) -> None:
        """UCE in the null space (RECE-NS's first edit), then the concepts' own rows projected out."""
        self._removed = []
        super().initial_edit(editor, concepts)
        rows = torch.cat([e.embedding for e in editor.encoded(list(concepts.erase))])
        self._project(editor, concepts, rows)

    def round(self, editor: Editor, concepts: ConceptSet) -> None:
        """Eq. 8's c' for every concept in the current state, its directions projected out."""
        derived = editor.derived_embeddings(concepts, self.reg)
        self._project(editor, concepts, torch.cat([derived[name] for name in concepts.erase]))

    def _project(self, editor: Editor, concepts: ConceptSet, rows: torch.Tensor) -> None:
        left, right = concept_projection(editor.hessian, self.null_space(editor, concepts), rows, self.share)
        editor.compose(left, right)
        self._removed.append(right.shape[1])

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["projection"] = {"share": self.share, "directions_removed": list(self._removed)}
        return settings

    def settings_after(self, rounds: int) -> dict[str, Any]:
        settings = self.settings()
        settings["projection"]["directions_removed"] = list(self._removed[: rounds + 1])
        return settings
