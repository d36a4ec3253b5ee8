"""UCE (Gandikota et al., WACV 2024): one closed-form edit (Eq. 3) that maps each concept's embedding onto its
guide's while preserving the guides and ``preserve`` prompts. It is RECE's preliminary edit, and a method alone."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rece_lightning.data import ConceptSet
from rece_lightning.methods.base import Editor, ErasureMethod, check_regulariser
from rece_lightning.tokens import TOKEN_MODES, TokenMode, select_tokens
from rece_lightning.validation import check_choice, check_non_negative


class UCE(ErasureMethod):
    """Eq. 3 once, on the concepts' own embeddings.

    Args:
        lamb: lambda_2 of Eq. 2, the pull of the edit towards the current weights (reference 0.1).
        erase_scale: weight of the erase term of Eq. 2 (reference 1).
        preserve_scale: lambda_1 of Eq. 2, weight of the preserve term (reference 0.1).
        tokens: token positions of the erase pairs: ``last_word_onward`` (reference: from each prompt's last word
            token to the end, aligned between concept and guide) or ``all``.
        preserve_guides: as in the reference code, also preserve each concept's guide prompt over all positions with
            ``preserve_scale`` (once per concept).
    """

    name = "UCE"
    has_rounds = False

    def __init__(
        self,
        lamb: float = 0.1,
        erase_scale: float = 1.0,
        preserve_scale: float = 0.1,
        tokens: TokenMode = "last_word_onward",
        preserve_guides: bool = True,
    ) -> None:
        self.lamb = check_regulariser("lamb", lamb)
        self.erase_scale = check_non_negative("erase_scale", erase_scale)
        self.preserve_scale = check_non_negative("preserve_scale", preserve_scale)
        self.tokens = check_choice("tokens", tokens, TOKEN_MODES)
        self.preserve_guides = bool(preserve_guides)

    def initial_edit(self, editor: Editor, concepts: ConceptSet) -> None:
        uce_edit(editor, concepts, self.tokens, self.preserve_guides, self.lamb, self.erase_scale, self.preserve_scale)

    def settings(self) -> dict[str, Any]:
        return {
            "hyperparameters": edit_weights(self),
            "token_modes": {"uce": self.tokens},
            "preserve_guides": self.preserve_guides,
        }


def edit_weights(method: UCE | ErasureMethod) -> dict[str, float]:
    """Eq. 2's three weights of a method, as its manifest records them."""
    return {"lamb": method.lamb, "erase_scale": method.erase_scale, "preserve_scale": method.preserve_scale}


def uce_pairs(editor: Editor, concepts: ConceptSet, tokens: TokenMode) -> tuple[list[Tensor], list[Tensor]]:
    """The UCE edit's erase pairs: each concept's embedding rows and its guide's, aligned by ``tokens``."""
    sources, targets = [], []
    for concept, guide in zip(editor.encoded(list(concepts.erase)), editor.encoded(list(concepts.guides)), strict=True):
        source, target = select_tokens(concept.embedding, concept.length, guide.embedding, guide.length, tokens)
        sources.append(source)
        targets.append(target)
    return sources, targets


def uce_edit(
    editor: Editor,
    concepts: ConceptSet,
    tokens: TokenMode,
    preserve_guides: bool,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    null_space: Tensor | None = None,
    softly_preserved: bool = True,
) -> None:
    """Eq. 3 on the concepts' own embeddings, each aligned with its guide's by ``tokens`` (``null_space``: the
    update confined to those directions)."""
    editor.encoded(concepts.prompts)  # every prompt of the edit in one batch of the text encoder, not one per role
    sources, targets = uce_pairs(editor, concepts, tokens)
    preserved = editor.preserved(concepts, with_guides=preserve_guides, with_preserve=softly_preserved)
    editor.edit(
        sources,
        targets,
        preserved,
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        null_space=null_space,
    )
