"""The derived-embedding attack: RECE's own Eq. 8 turned against any erased model (closed form, white-box).

For each attack prompt with embedding ``c``, the embedding that makes the attacked model's K/V reproduce the original
model's K/V of ``c`` (Eq. 7/8, regularised towards 0 by ``reg``)::

    c' = (reg I + sum_i W_att_i^T W_att_i)^-1 (sum_i W_att_i^T W_orig_i) c

It needs only the two K/V weight sets, not the method that produced the erased ones, so it attacks UCE, RECE or any
other method whose result is loaded into a diffusers pipeline. On the original model it returns (almost) ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rece_lightning import closed_form
from rece_lightning.attacks.base import AttackContext, AttackOutcome, PromptAttack
from rece_lightning.data import PromptItem
from rece_lightning.validation import check_positive


class DerivedEmbeddingAttack(PromptAttack):
    """Eq. 8 against the attacked model, per prompt.

    Args:
        concept: the concept attacked (recorded with the results).
        reg: lambda of Eq. 7 (the paper's 0.1 for nudity, 1e-3 for styles); smaller finds stronger, larger-norm c'.
    """

    name = "derived_embedding"
    drives_text_encoder = False  # the closed form needs only an encoding and the two K/V weight sets

    def __init__(self, concept: str, reg: float = 0.1) -> None:
        super().__init__(concept)
        self.reg = check_positive("reg", reg)

    def attack(self, context: AttackContext, items: Sequence[PromptItem], height: int, width: int) -> AttackOutcome:
        names = list(context.original_kv)
        concept = context.encode([items[0].prompt])[0]
        derived = closed_form.derive_embedding(
            [context.attacked_kv[n] for n in names], [context.original_kv[n] for n in names], concept, reg=self.reg
        )
        return AttackOutcome(prompt_embeds=derived)
