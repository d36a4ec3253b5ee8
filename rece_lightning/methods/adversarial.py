"""RECE with an attack in the loop: each derive-erase round also erases what a prompt-space attack finds against
the current model, so that the next attacker starts from a model that has already seen the strongest words.

Two attacks, both scored in closed form against the current model: a candidate prompt ranks by how close its K/V
outputs in the *edited* model come to the erased concept's K/V in the *original* one (``closed_form.kv_distances``, a
quadratic form in G), less how far it is from the guide in the original model (so that generic prompts, near
everything, rank low); the ``attack_budget`` best prompts per concept are erased towards the guide in the same Eq. 3
edit as c'.

- ``vocabulary``: every candidate word as its own prompt (the synonym search of the issue): a ranking.
- ``prompt_search``: Ring-A-Bell's genetic search of multi-word prompts (``search_words`` words each, from the
  concept's own words, its ``candidates`` nearest vocabulary words and the function words), with that score as its
  fitness instead of Ring-A-Bell's fixed text-space target: what it finds is what still brings the concept back in
  *this* model ("red red a red shape" after UCE erased "red" at the positions it saw).

No gradient anywhere: the searches rank and the edit solves. With ``hard_preservation`` every edit is confined to the
preserved prompts' null space as well (:mod:`rece_lightning.methods.null_space`): the combination of both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rece_lightning.closed_form import kv_distances
from rece_lightning.data import ConceptSet
from rece_lightning.genetic import check_population, genetic_search
from rece_lightning.methods.base import Editor
from rece_lightning.methods.null_space import HardPreservation
from rece_lightning.methods.rece import RECE
from rece_lightning.tokens import select_tokens
from rece_lightning.validation import check_choice, check_positive_int

ATTACKS = ("vocabulary", "prompt_search")
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


# The function words a searched prompt may use as glue ("a red red shape"): erased only inside a found prompt's rows.
FUNCTION_WORDS = ("a", "an", "the", "of", "with", "and")
MAX_SEARCH_WORDS = 75


class AdversarialRECE(RECE):
    """RECE whose rounds also erase the vocabulary words that still bring each concept back.

    Args:
        attack: the in-loop attack: ``vocabulary`` (rank the candidate words by the K/V distance above) or
            ``prompt_search`` (a genetic search of ``search_words``-word prompts with that score as fitness).
        attack_budget: words (prompts) erased per concept per round (the attack's budget; > 0).
        candidates: words searched per concept: the nearest ``candidates`` vocabulary words to the concept's tokens
            (input token embeddings; the whole vocabulary of a small tokenizer), each encoded once.
        search_words / population / generations: ``prompt_search``'s prompt length in words, population size (>= 4)
            and rounds of selection; each round of the method encodes ``population x (generations + 1)`` prompts.
        seed: seeds ``prompt_search`` (round r uses ``seed + r``: a rerun finds the same prompts).
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
        search_words: int = 6,
        population: int = 64,
        generations: int = 20,
        seed: int = 0,
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
        self.search_words = check_positive_int("search_words", search_words)
        if self.search_words > MAX_SEARCH_WORDS:
            raise ValueError(
                f"search_words={search_words} is not allowed: a searched prompt has at most {MAX_SEARCH_WORDS} words "
                "(77 positions with BOS and EOS)"
            )
        self.population = check_population(check_positive_int("population", population))
        self.generations = check_positive_int("generations", generations)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is not allowed: give a whole number")
        self.seed = seed
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
        if self.attack == "vocabulary":
            found = self.strongest_words(editor, concepts)
            encode = editor.encoded
        else:
            found = self.strongest_prompts(editor, concepts)
            encode = editor.encoded_uncached
        self.found.append(found)
        for concept, guide in zip(concepts.erase, editor.encoded(list(concepts.guides)), strict=True):
            for word in encode(found[concept]) if found[concept] else []:
                source, target = select_tokens(
                    word.embedding, word.length, guide.embedding, guide.length, self.rece_tokens
                )
                sources.append(source)
                targets.append(target)
        return sources, targets

    def strongest_words(self, editor: Editor, concepts: ConceptSet) -> dict[str, list[str]]:
        """Per concept, the ``attack_budget`` candidate words whose K/V outputs in the current model come closest to
        the concept's in the original model (hard-preserved words and the guides' words are not candidates)."""
        exclude = self._excluded(editor, concepts)
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

    def _excluded(self, editor: Editor, concepts: ConceptSet) -> set[str]:
        """Words no attack may use: the guides', the preserved prompts' and ``exclude_words``."""
        kept = set(concepts.preserve)
        if self.hard_preservation is not None:
            kept |= set(self.hard_preservation.prompts(editor, concepts))
        return {w for p in (*concepts.guides, *kept) for w in p.split()} | set(self.exclude_words)

    def _scores(self, editor: Editor, embeddings: Tensor, concept: str, guide: str) -> Tensor:
        """A searched prompt's K/V distance in the current model to ``concept``'s original K/V, over its distance to
        the guide's in the original (lower: brings the concept back more specifically).

        A ratio, not the vocabulary ranking's difference: every position of a longer prompt adds to both distances,
        and a difference rewards length (six words of other colours' things outrank "red red a red red shape")."""
        target = editor.encoded([concept])[0].embedding
        guide_embedding = editor.encoded([guide])[0].embedding
        eye = torch.eye(editor.gram.shape[0], dtype=editor.gram.dtype, device=editor.gram.device)
        towards = kv_distances(editor.gram, editor.transform, embeddings, target)
        return towards / kv_distances(editor.gram, eye, embeddings, guide_embedding).clamp_min(1e-12)

    def search_vocabulary(self, editor: Editor, concepts: ConceptSet, concept: str) -> list[str]:
        """The words ``prompt_search`` builds prompts of: the concept's own, its ``candidates`` nearest vocabulary
        words and :data:`FUNCTION_WORDS` (none of the guides' or the preserved prompts' content words)."""
        exclude = self._excluded(editor, concepts) - set(FUNCTION_WORDS)
        own = [w for w in concept.split() if w not in exclude]
        near = editor.words_near([concept], self.candidates, exclude=exclude)
        return list(dict.fromkeys([*own, *near, *FUNCTION_WORDS]))

    def strongest_prompts(self, editor: Editor, concepts: ConceptSet) -> dict[str, list[str]]:
        """Per concept, the ``attack_budget`` best distinct prompts of Ring-A-Bell's genetic search
        (:func:`~rece_lightning.genetic.genetic_search`) over ``search_words``-word prompts, with :meth:`_scores` in
        the current model as the fitness."""
        generator = torch.Generator().manual_seed(self.seed + len(self.found))
        found = {}
        for concept, guide in zip(concepts.erase, concepts.guides, strict=True):
            words = self.search_vocabulary(editor, concepts, concept)

            def fitness(population: Tensor, concept: str = concept, guide: str = guide, words: list = words) -> Tensor:
                prompts = [" ".join(words[i] for i in row) for row in population.tolist()]
                embeddings = torch.stack([e.embedding for e in editor.encoded_uncached(prompts)])
                return self._scores(editor, embeddings, concept, guide).cpu()

            search = genetic_search(
                fitness, len(words), self.search_words, self.population, self.generations, generator
            )
            best: list[str] = []
            for row in search.population.tolist():
                prompt = " ".join(words[i] for i in row)
                if prompt not in best:
                    best.append(prompt)
                if len(best) == self.attack_budget:
                    break
            found[concept] = best
        return found

    @property
    def _found_key(self) -> str:
        """The manifest field of what each round's attack found."""
        return "words_erased" if self.attack == "vocabulary" else "prompts_erased"

    def settings_after(self, rounds: int) -> dict[str, Any]:
        settings = self.settings()
        settings[self._found_key] = settings[self._found_key][:rounds]
        return settings

    def init_args(self) -> dict[str, Any]:
        args = {k: v for k, v in super().init_args().items() if k != "found"}
        args["hard_preservation"] = None if self.hard_preservation is None else vars(self.hard_preservation)
        return args

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["attack"] = {"kind": self.attack, "budget": self.attack_budget, "candidates": self.candidates}
        if self.attack == "prompt_search":
            settings["attack"].update(
                search_words=self.search_words,
                population=self.population,
                generations=self.generations,
                seed=self.seed,
            )
        settings["hard_preservation"] = None if self.hard_preservation is None else dict(vars(self.hard_preservation))
        settings[self._found_key] = self.found
        return settings
