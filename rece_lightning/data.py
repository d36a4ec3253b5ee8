"""Data: the concepts one RECE epoch erases, and the prompt sets the evaluation generates from.

RECE has no data set in the usual sense: every epoch derives and erases the same concepts (Algorithm 1, lines 8-16).
So the training data is one batch, the whole ``ConceptSet``, yielded once per epoch. Evaluation reads prompt CSVs
(I2P, the nudity set, Ring-A-Bell, artists, COCO-30k) and splits them across processes without repeats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rece_lightning.prompt_sets import resolve_prompt_csv

__all__ = [
    "ConceptDataModule",
    "ConceptDataset",
    "ConceptSet",
    "PromptDataModule",
    "PromptDataset",
    "PromptItem",
    "UnpaddedDistributedSampler",
    "read_prompt_csv",
]


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
        for name, values in (("erase_concepts", erase), ("preserve_concepts", preserve)):
            repeated = sorted({c for c in values if values.count(c) > 1})
            if repeated:
                raise ValueError(f"{name} lists {repeated} more than once: give each concept once")
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
    """Yields the concept set once per epoch: the model's own (``RECEModule(erase_concepts=...)``) unless given.

    The concepts are configured once, on the model; this data module has no second list that could disagree.
    """

    def __init__(self, concepts: ConceptSet | None = None) -> None:
        super().__init__()
        self.concepts = concepts

    @classmethod
    def from_concepts(cls, concepts: ConceptSet) -> ConceptDataModule:
        return cls(concepts)

    def train_dataloader(self) -> DataLoader:
        concepts = self.concepts
        if concepts is None:
            model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            concepts = getattr(model, "concepts", None)
            if not isinstance(concepts, ConceptSet):
                raise ValueError("ConceptDataModule needs the concepts: attach it to a RECEModule or give a ConceptSet")
        return DataLoader(ConceptDataset(concepts), batch_size=1, collate_fn=_single_item)


# --- prompt sets for evaluation ------------------------------------------------------------------------------------

PROMPT_COLUMNS = ("prompt", "sensitive prompt")  # I2P / COCO / artists; Ring-A-Bell's attack prompts


@dataclass
class PromptItem:
    """One image to generate: prompt ``case_number``'s ``index``-th image, with its own seed and guidance."""

    case_number: int
    index: int
    prompt: str
    seed: int
    guidance: float
    group: str = ""  # the artist (LPIPS_e / LPIPS_u split) or the I2P categories
    height: int | None = None  # the prompt's own image size (I2P's sd_image_height / sd_image_width), if any
    width: int | None = None
    placeholder: bool = False  # stands in on a process that has no prompt, so that it still joins every collective

    @property
    def prompt_key(self) -> str:
        """``<case_number>_<hash>``: the prompt, seed, guidance and size hashed in, so that two prompt sets whose case
        numbers overlap keep their own files in one output folder."""
        text = f"{self.prompt}|{self.seed - self.index}|{self.guidance}|{self.height}|{self.width}"
        return f"{self.case_number}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"

    @property
    def image_name(self) -> str:
        return f"{self.prompt_key}_{self.index}.png"

    @classmethod
    def make_placeholder(cls) -> PromptItem:
        return cls(case_number=-1, index=0, prompt="", seed=0, guidance=0.0, placeholder=True)


def check_selection(offset: int, limit: int | None) -> None:
    if offset < 0 or (limit is not None and limit < 1):
        raise ValueError(f"offset={offset}, limit={limit}: offset must be >= 0 and limit >= 1 (or null for all)")


def read_prompt_csv(
    path: str,
    *,
    option: str = "prompts_csv",
    prompt_column: str | None = None,
    categories: Sequence[str] | None = None,
    artists: Sequence[str] | None = None,
    offset: int = 0,
    limit: int | None = None,
    default_seed: int = 42,
    default_guidance: float = 7.5,
):
    """Read and select a prompt CSV (a local path or a Hugging Face dataset id, see
    :mod:`rece_lightning.prompt_sets`): columns ``prompt`` (or Ring-A-Bell's ``sensitive prompt``), optional
    ``evaluation_seed``, ``evaluation_guidance``, ``case_number``, ``categories``, ``artist`` and I2P's
    ``sd_image_height`` / ``sd_image_width`` (the size each prompt's reference image was made at).

    Filters apply in this order: categories (any match in I2P's comma-separated list), artists, then the row range
    ``[offset, offset + limit)``. Returns a DataFrame with normalised columns.
    """
    import pandas as pd

    check_selection(offset, limit)
    path = str(resolve_prompt_csv(path, option))
    frame = pd.read_csv(path)
    column = prompt_column or next((c for c in PROMPT_COLUMNS if c in frame.columns), None)
    if column is None or column not in frame.columns:
        raise ValueError(
            f"{path!r} has no prompt column ({prompt_column or ' or '.join(PROMPT_COLUMNS)}); its columns are "
            f"{list(frame.columns)}"
        )
    selected = pd.DataFrame(
        {
            "prompt": frame[column].fillna("").astype(str),
            "case_number": frame["case_number"] if "case_number" in frame.columns else range(len(frame)),
            "seed": frame["evaluation_seed"] if "evaluation_seed" in frame.columns else default_seed,
            "guidance": frame["evaluation_guidance"] if "evaluation_guidance" in frame.columns else default_guidance,
            "categories": frame["categories"].fillna("").astype(str) if "categories" in frame.columns else "",
            "artist": frame["artist"].fillna("").astype(str) if "artist" in frame.columns else "",
            "height": _sizes(frame, "sd_image_height"),
            "width": _sizes(frame, "sd_image_width"),
        }
    )
    if categories:
        if "categories" not in frame.columns:
            raise ValueError(f"categories={list(categories)} given but {path!r} has no 'categories' column")
        wanted = {c.strip().lower() for c in categories}
        keep = selected["categories"].map(lambda cell: bool(wanted & {c.strip().lower() for c in cell.split(",")}))
        selected = selected[keep]
    if artists:
        if "artist" not in frame.columns:
            raise ValueError(f"artists={list(artists)} given but {path!r} has no 'artist' column")
        selected = selected[selected["artist"].isin(list(artists))]
    selected = selected.iloc[offset : None if limit is None else offset + limit]
    if selected.empty:
        raise ValueError(
            f"no prompt of {path!r} is selected by categories={categories}, artists={artists}, offset={offset}, "
            f"limit={limit}"
        )
    _check_numbers(selected, path)
    if selected["case_number"].duplicated().any():
        raise ValueError(f"{path!r} repeats case numbers; each prompt needs its own (image files are named by it)")
    return selected.reset_index(drop=True)


def _check_numbers(selected, path: str) -> None:
    """Every selected seed and case number must be a whole number and every guidance a finite number: a bad cell
    stops the run here, naming its row, before any model loads (not halfway through generation)."""
    import numpy as np
    import pandas as pd

    for column, source, whole in (
        ("seed", "evaluation_seed", True),
        ("case_number", "case_number", True),
        ("guidance", "evaluation_guidance", False),
    ):
        values = pd.to_numeric(selected[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if whole:
            bad |= ~bad & (values.to_numpy(dtype=float) % 1 != 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path!r}: {source}={_plain(selected[column].iloc[row])!r} in selected row {row} (prompt "
                f"{str(selected['prompt'].iloc[row])[:40]!r}) is not allowed: it must be "
                + ("a whole number" if whole else "a finite number")
            )
        selected[column] = values.astype(int if whole else float)


def _plain(value):
    """A pandas / numpy scalar as the Python value it holds (so messages read ``nan``, not ``np.float64(nan)``)."""
    return value.item() if hasattr(value, "item") else value


def _sizes(frame, column: str) -> list[int | None]:
    """A size column as ints, None where absent or not a positive multiple of 8 (I2P has a few broken rows)."""
    if column not in frame.columns:
        return [None] * len(frame)
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    return [int(v) if v == v and v > 0 and v % 8 == 0 else None for v in values]


def _int_or_none(value) -> int | None:
    return None if value is None or value != value else int(value)  # pandas turns None into NaN in a number column


class PromptDataset(Dataset):
    """Every (prompt, image index) pair: ``images_per_prompt`` items per prompt, image k seeded ``seed + k``."""

    def __init__(self, frame, images_per_prompt: int = 1) -> None:
        self.items = [
            PromptItem(
                case_number=int(row.case_number),
                index=k,
                prompt=row.prompt,
                seed=int(row.seed) + k,
                guidance=float(row.guidance),
                group=row.artist or row.categories,
                height=_int_or_none(row.height),
                width=_int_or_none(row.width),
            )
            for row in frame.itertuples()
            for k in range(images_per_prompt)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        if index == PLACEHOLDER_INDEX:
            return PromptItem.make_placeholder()
        return self.items[index]


PLACEHOLDER_INDEX = -1


class UnpaddedDistributedSampler(DistributedSampler):
    """Every item exactly once, no padding (``DistributedSampler`` repeats items to even out ranks, which would
    generate and count some prompts twice). Being a ``DistributedSampler``, Lightning leaves it in place.

    A ``PromptDataset`` is split by prompt: rank r takes prompts r, r + N, ... with all their images, so a per-prompt
    figure (a prompt's attack succeeds if any of its images is unsafe) is exact on each rank. Other data sets are split
    item by item. A rank left without items gets one placeholder (``PLACEHOLDER_INDEX``, a ``PromptItem`` with
    ``placeholder=True``) instead: Lightning refuses an empty loader, and the rank must still join every collective.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if isinstance(dataset, PromptDataset):
            prompts = list(dict.fromkeys(item.case_number for item in dataset.items))
            mine = set(prompts[rank::num_replicas])
            self.indices = [i for i, item in enumerate(dataset.items) if item.case_number in mine]
            if not self.indices:
                self.indices = [PLACEHOLDER_INDEX]
        else:
            self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _item_list(batch: list[PromptItem]) -> list[PromptItem]:
    return batch


class PromptDataModule(pl.LightningDataModule):
    """A prompt set as test data, split across processes so that each image is generated exactly once.

    The prompts are read when the run needs them (``setup``), so a config naming a set that is not here yet still
    instantiates; a set that cannot be had then stops the run before any model loads, saying where to get it.

    Args:
        prompts_csv: a local prompt CSV, or a Hugging Face dataset id (``AIML-TUDA/i2p``, or
            ``org/name/file.csv``), downloaded once into the Hugging Face cache (``HF_HUB_OFFLINE=1`` reads the cache).
        offset: first selected row (after the category / artist filters).
        limit: number of rows to take from ``offset`` (``null``: all).
        images_per_prompt: images per prompt; image k uses seed ``evaluation_seed + k``.
        categories: keep I2P rows whose ``categories`` include any of these (e.g. ``[sexual]``).
        artists: keep rows whose ``artist`` is one of these.
        prompt_column: column holding the prompt (default: ``prompt``, else ``sensitive prompt``).
        default_seed: seed where the CSV has no ``evaluation_seed``.
        default_guidance: guidance scale where the CSV has no ``evaluation_guidance``.
        batch_size: prompts per pipeline call (grouped by guidance scale and size).
    """

    def __init__(
        self,
        prompts_csv: str,
        offset: int = 0,
        limit: int | None = None,
        images_per_prompt: int = 1,
        categories: list[str] | None = None,
        artists: list[str] | None = None,
        prompt_column: str | None = None,
        default_seed: int = 42,
        default_guidance: float = 7.5,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        if images_per_prompt < 1 or batch_size < 1:
            raise ValueError(f"images_per_prompt={images_per_prompt}, batch_size={batch_size}: both must be >= 1")
        if not isinstance(prompts_csv, str) or not prompts_csv.strip():
            raise ValueError(
                f"prompts_csv={prompts_csv!r} is not allowed: give a CSV path or a Hugging Face dataset id"
            )
        check_selection(offset, limit)
        self.prompts_csv = prompts_csv
        self.selection = {
            "prompt_column": prompt_column,
            "categories": categories,
            "artists": artists,
            "offset": offset,
            "limit": limit,
            "default_seed": default_seed,
            "default_guidance": default_guidance,
        }
        self.images_per_prompt = images_per_prompt
        self.batch_size = batch_size
        self._frame = None
        self._dataset: PromptDataset | None = None

    def setup(self, stage: str) -> None:
        self.frame  # noqa: B018  (read the prompts now: a missing set stops the run before the model loads)

    @property
    def frame(self):
        """The selected prompts (read on first use)."""
        if self._frame is None:
            self._frame = read_prompt_csv(self.prompts_csv, **self.selection)
        return self._frame

    @property
    def dataset(self) -> PromptDataset:
        if self._dataset is None:
            self._dataset = PromptDataset(self.frame, self.images_per_prompt)
        return self._dataset

    @property
    def num_prompts(self) -> int:
        return len(self.frame)

    def test_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer_attached() else (1, 0)
        sampler = UnpaddedDistributedSampler(self.dataset, num_replicas=world, rank=rank)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_item_list)

    predict_dataloader = test_dataloader

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None
