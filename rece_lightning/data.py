"""Concepts as data: the set of (concept, guide) pairs and preserved prompts that one RECE epoch erases.

RECE has no data set in the usual sense: every epoch derives and erases the same concepts (Algorithm 1, lines 8-16).
So the training data is one batch, the whole ``ConceptSet``, yielded once per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

__all__ = ["ConceptDataModule", "ConceptDataset", "ConceptSet"]


def _as_list(name: str, value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name}={value!r} is not allowed: give a string or a list of strings")
    return list(value)


@dataclass  # not frozen: Lightning's batch transfer copies dataclasses field by field
class ConceptSet:
    """Concepts to erase, each with its guide (destination, Eq. 2's c*), and concepts to preserve (Eq. 2's P)."""

    erase: tuple[str, ...]
    guides: tuple[str, ...]
    preserve: tuple[str, ...] = ()

    @classmethod
    def from_config(
        cls,
        erase_concepts: str | Sequence[str],
        guide_concepts: str | Sequence[str] = " ",
        preserve_concepts: str | Sequence[str] | None = None,
    ) -> ConceptSet:
        """Validate the user's lists; one guide is shared by all concepts (" " is the empty prompt)."""
        erase = _as_list("erase_concepts", erase_concepts)
        if not erase:
            raise ValueError("erase_concepts=[] is not allowed: give at least one concept to erase, e.g. ['nudity']")
        for index, concept in enumerate(erase):
            if not concept.strip():
                raise ValueError(
                    f"erase_concepts[{index}]={concept!r} is not allowed: a concept to erase must contain words"
                )
        guides = _as_list("guide_concepts", guide_concepts)
        if len(guides) == 1:
            guides = guides * len(erase)
        if len(guides) != len(erase):
            raise ValueError(
                f"guide_concepts has {len(guides)} entries but erase_concepts has {len(erase)}: give one guide for "
                "all concepts or one per concept"
            )
        preserve = _as_list("preserve_concepts", preserve_concepts)
        for index, concept in enumerate(preserve):
            if not concept.strip():
                raise ValueError(
                    f"preserve_concepts[{index}]={concept!r} is not allowed: a concept to preserve must contain words"
                )
        overlap = sorted(set(erase) & set(preserve))
        if overlap:
            raise ValueError(f"{overlap} are both erased and preserved: a concept can be only one of the two")
        return cls(tuple(erase), tuple(guides), tuple(preserve))

    @property
    def prompts(self) -> list[str]:
        """Every distinct prompt the set needs encoded, in a stable order."""
        return list(dict.fromkeys((*self.erase, *self.guides, *self.preserve)))


class ConceptDataset(Dataset):
    """A data set of one item, the concept set: one epoch is one derive-erase round."""

    def __init__(self, concepts: ConceptSet) -> None:
        self.concepts = concepts

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> ConceptSet:
        if index != 0:
            raise IndexError(index)
        return self.concepts


def _single_item(batch: list[ConceptSet]) -> ConceptSet:
    return batch[0]


class ConceptDataModule(pl.LightningDataModule):
    """Yields the concept set once per epoch.

    Args:
        erase_concepts: concepts to erase, e.g. ``["nudity"]`` or five artists' names.
        guide_concepts: destination of each concept (one for all, or one per concept); " " is the empty prompt.
        preserve_concepts: concepts whose K/V outputs are kept (Eq. 2's second term).
    """

    def __init__(
        self,
        erase_concepts: str | list[str] = "nudity",
        guide_concepts: str | list[str] = " ",
        preserve_concepts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.concepts = ConceptSet.from_config(erase_concepts, guide_concepts, preserve_concepts)

    @classmethod
    def from_concepts(cls, concepts: ConceptSet) -> ConceptDataModule:
        return cls(list(concepts.erase), list(concepts.guides), list(concepts.preserve))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ConceptDataset(self.concepts), batch_size=1, collate_fn=_single_item)
