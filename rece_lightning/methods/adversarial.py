"""RECE with an attack in the loop: each derive-erase round also erases what a prompt-space attack finds against
the current model, so that the next attacker starts from a model that has already seen the strongest words.

The attack is a search through the tokenizer's vocabulary (the synonym search of the issue, in closed form): every
candidate word, as its own prompt, is scored by how close its K/V outputs in the *edited* model come to the erased
concept's K/V in the *original* one (``closed_form.kv_distances``, a quadratic form in G), less how far it is from
the guide in the original model (so that generic words, near everything, rank low); the ``attack_budget`` best
words per concept are erased towards the guide in the same Eq. 3 edit as c'. No gradient anywhere: the
search is a ranking and the edit a solve. With ``hard_preservation`` it is confined to the preserved prompts' null
space as well (:mod:`rece_lightning.methods.null_space`): the combination of both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rece_lightning.closed_form import kv_distances
from rece_lightning.data import ConceptSet
from rece_lightning.methods.base import Editor
from rece_lightning.methods.null_space import HardPreservation
from rece_lightning.methods.rece import RECE
from rece_lightning.tokens import select_tokens
from rece_lightning.validation import check_choice, check_positive_int

ATTACKS = ("vocabulary",)
# Function words: close to anything in K/V space, erasing them damages every prompt (the toy search picks "the", "an")
STOP_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "by",
    "for",
    "with",
    "and",
    "or",
    "is",
    "are",
    "as",
    "it",
    "its",
    "this",
    "that",
    "from",
    "into",
    "over",
    "under",
    "photo",
    "picture",
    "image",
    "background",
)


class AdversarialRECE(RECE):
    """RECE whose rounds also erase the vocabulary words that still bring each concept back.

    Args:
        attack: the in-loop attack: ``vocabulary`` (rank the candidate words by the K/V distance above).
        attack_budget: words erased per concept per round (the attack's budget; > 0).
        candidates: words searched per concept: the nearest ``candidates`` vocabulary words to the concept's tokens
            (input token embeddings; the whole vocabulary of a small tokenizer), each encoded once.
        hard_preservation: also confine every edit to the null space of these prompts (None: soft preservation only).
        exclude_words: words the search never erases (default: function words and picture words, :data:`STOP_WORDS`).
        **rece: RECE's options (``lamb``, ``reg``, ...).
    """

    name = "RECE-ADV"

    def __init__(
        self,
        attack: str | None = "vocabulary",
        attack_budget: int = 4,
        candidates: int = 512,
        hard_preservation: HardPreservation | None = None,
        exclude_words: list[str] | None = None,
        **rece: Any,
    ) -> None:
        super().__init__(**rece)
        self.exclude_words = list(STOP_WORDS if exclude_words is None else exclude_words)
        if attack is None:
            raise ValueError(
                f"attack=None is not allowed for {self.name}: an attack-in-the-loop method needs one of "
                f"{list(ATTACKS)} (plain RECE is rece_lightning.methods.RECE)"
            )
        self.attack = check_choice("attack", attack, ATTACKS)
        self.attack_budget = check_positive_int("attack_budget", attack_budget)
        self.candidates = check_positive_int("candidates", candidates)
        if isinstance(hard_preservation, Mapping):  # from a checkpoint's spec
            hard_preservation = HardPreservation(**hard_preservation)
        self.hard_preservation = hard_preservation
        self._bases: dict[tuple, Tensor] = {}
        self._content: dict[tuple, Tensor] = {}
        self.found: list[dict[str, list[str]]] = []  # per round: the words erased for each concept

    @property
    def softly_preserved(self) -> bool:  # with hard preservation, the preserved prompts are kept exactly
        return self.hard_preservation is None

    def null_space(self, editor: Editor, concepts: ConceptSet) -> Tensor | None:
        if self.hard_preservation is None:
            return None
        return self.hard_preservation.cached_basis(self._bases, editor, concepts)

    def round_rows(self, editor: Editor, concepts: ConceptSet) -> tuple[list[Tensor], list[Tensor]]:
        sources, targets = super().round_rows(editor, concepts)
        found = self.strongest_words(editor, concepts)
        self.found.append(found)
        for concept, guide in zip(concepts.erase, editor.encoded(list(concepts.guides)), strict=True):
            for word in editor.encoded(found[concept]):
                source, target = select_tokens(
                    word.embedding, word.length, guide.embedding, guide.length, self.rece_tokens
                )
                sources.append(source)
                targets.append(target)
        return sources, targets

    def strongest_words(self, editor: Editor, concepts: ConceptSet) -> dict[str, list[str]]:
        """Per concept, the ``attack_budget`` candidate words whose K/V outputs in the current model come closest to
        the concept's in the original model (hard-preserved words and the guides' words are not candidates)."""
        kept = set(concepts.preserve)
        if self.hard_preservation is not None:
            kept |= set(self.hard_preservation.prompts(editor, concepts))
        exclude = {w for p in (*concepts.guides, *kept) for w in p.split()} | set(self.exclude_words)
        found = {}
        for concept in concepts.erase:
            words = editor.words_near([concept], self.candidates, exclude=exclude)
            if not words:
                found[concept] = []
                continue
            embeddings = torch.stack([e.embedding for e in editor.encoded(words)])
            target = editor.encoded([concept])[0].embedding
            guide = editor.encoded([concepts.guides[concepts.erase.index(concept)]])[0].embedding
            # closer to the concept in the edited model than it is to the guide in the original one: a content word
            # that brings the concept back, not a generic one (any word is near everything in a 16-row K/V space)
            towards = kv_distances(editor.gram, editor.transform, embeddings, target)
            key = (id(editor), concept, tuple(words))
            if key not in self._content:  # a property of the base model: computed once, not every round
                eye = torch.eye(editor.gram.shape[0], dtype=editor.gram.dtype, device=editor.gram.device)
                self._content[key] = kv_distances(editor.gram, eye, embeddings, guide)
            content = self._content[key]
            order = (towards - content).argsort()[: self.attack_budget].tolist()
            found[concept] = [words[i] for i in order]
        return found

    def init_args(self) -> dict[str, Any]:
        args = {k: v for k, v in super().init_args().items() if k != "found"}
        args["hard_preservation"] = None if self.hard_preservation is None else vars(self.hard_preservation)
        return args

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["attack"] = {"kind": self.attack, "budget": self.attack_budget, "candidates": self.candidates}
        settings["hard_preservation"] = None if self.hard_preservation is None else dict(vars(self.hard_preservation))
        settings["words_erased"] = self.found
        return settings
