"""RECE (Gong et al., ECCV 2024), Algorithm 1: UCE's edit, then one derive-erase round per epoch.

Each round derives, for each concept, the embedding c' that still regenerates it in the edited model (Eq. 8: the
closed-form minimiser of Eq. 7, regularised towards 0 by ``reg``) and erases every c' with Eq. 3.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rece_lightning.data import ConceptSet
from rece_lightning.methods.base import Editor, ErasureMethod, check_regulariser
from rece_lightning.methods.uce import edit_weights, uce_edit
from rece_lightning.tokens import TOKEN_MODES, TokenMode, select_tokens
from rece_lightning.validation import check_choice, check_non_negative


class RECE(ErasureMethod):
    """UCE, then derive-erase rounds.

    Args:
        lamb: lambda_2 of Eq. 2, the pull of each edit towards the current weights (reference 0.1).
        erase_scale: weight of the erase term of Eq. 2 (reference 1).
        preserve_scale: lambda_1 of Eq. 2, weight of the preserve term (reference 0.1).
        reg: lambda of Eq. 7, pulls the derived embedding c' towards 0 to spare unrelated concepts (Theorem 1);
            0.1 for nudity / unsafe concepts, 1e-3 for artistic styles.
        uce_tokens: token positions of the preliminary UCE edit: ``last_word_onward`` (reference: from each prompt's
            last word token to the end, aligned between concept and guide) or ``all``.
        rece_tokens: token positions of the rounds' erase pairs (c', guide): ``all`` (reference) or
            ``last_word_onward``.
        preserve_guides: as in the reference code, also preserve each concept's guide prompt over all positions with
            ``preserve_scale`` (once per concept) in every edit.
        uce_lamb: lambda_2 of the preliminary UCE edit alone (``null``: ``lamb``). The authors' ``train_uce.py`` uses
            0.5 there while their epochs use 0.1.
        uce_preserve_scale: lambda_1 of the preliminary UCE edit alone (``null``: ``preserve_scale``); the authors'
            released nudity model used 1.0.
    """

    name = "RECE"

    def __init__(
        self,
        lamb: float = 0.1,
        erase_scale: float = 1.0,
        preserve_scale: float = 0.1,
        reg: float = 0.1,
        uce_tokens: TokenMode = "last_word_onward",
        rece_tokens: TokenMode = "all",
        preserve_guides: bool = True,
        uce_lamb: float | None = None,
        uce_preserve_scale: float | None = None,
    ) -> None:
        self.lamb = check_regulariser("lamb", lamb)
        self.erase_scale = check_non_negative("erase_scale", erase_scale)
        self.preserve_scale = check_non_negative("preserve_scale", preserve_scale)
        self.reg = check_regulariser("reg", reg)
        self.uce_tokens = check_choice("uce_tokens", uce_tokens, TOKEN_MODES)
        self.rece_tokens = check_choice("rece_tokens", rece_tokens, TOKEN_MODES)
        self.preserve_guides = bool(preserve_guides)
        self.uce_lamb = None if uce_lamb is None else check_regulariser("uce_lamb", uce_lamb)
        self.uce_preserve_scale = (
            None if uce_preserve_scale is None else check_non_negative("uce_preserve_scale", uce_preserve_scale)
        )

    @property
    def probe_reg(self) -> float:
        return self.reg

    def initial_edit(self, editor: Editor, concepts: ConceptSet) -> None:
        """Algorithm 1, line 6: the preliminary UCE edit."""
        uce_edit(
            editor,
            concepts,
            self.uce_tokens,
            self.preserve_guides,
            lamb=self.lamb if self.uce_lamb is None else self.uce_lamb,
            erase_scale=self.erase_scale,
            preserve_scale=self.preserve_scale if self.uce_preserve_scale is None else self.uce_preserve_scale,
            null_space=self.null_space(editor, concepts),
            softly_preserved=self.softly_preserved,
        )

    def round(self, editor: Editor, concepts: ConceptSet) -> None:
        """Algorithm 1, lines 8-16: derive c' for each concept (Eq. 8), erase all c' at once (Eq. 3)."""
        sources, targets = self.round_rows(editor, concepts)
        editor.edit(
            sources,
            targets,
            editor.preserved(concepts, with_guides=self.preserve_guides, with_preserve=self.softly_preserved),
            lamb=self.lamb,
            erase_scale=self.erase_scale,
            preserve_scale=self.preserve_scale,
            null_space=self.null_space(editor, concepts),
        )

    def round_rows(self, editor: Editor, concepts: ConceptSet) -> tuple[list[Tensor], list[Tensor]]:
        """The round's erase pairs: each concept's c' (Eq. 8) aligned with its guide by ``rece_tokens``."""
        derived = editor.derived_embeddings(concepts, self.reg)
        sources, targets = [], []
        for name, guide in zip(concepts.erase, editor.encoded(list(concepts.guides)), strict=True):
            concept_length = editor.encoded([name])[0].length
            source, target = select_tokens(
                derived[name], concept_length, guide.embedding, guide.length, self.rece_tokens
            )
            sources.append(source)
            targets.append(target)
        return sources, targets

    def null_space(self, editor: Editor, concepts: ConceptSet) -> Tensor | None:
        """The directions every edit is confined to (None: all; hard-preserving methods narrow them)."""
        return None

    def settings(self) -> dict[str, Any]:
        return {
            "hyperparameters": {
                **edit_weights(self),
                "reg": self.reg,
                "uce_lamb": self.uce_lamb,
                "uce_preserve_scale": self.uce_preserve_scale,
            },
            "token_modes": {"uce": self.uce_tokens, "rece": self.rece_tokens},
            "preserve_guides": self.preserve_guides,
        }
