"""The interface of a closed-form erasure method over the shared transform ``W_new = W_orig · M``.

A method says how an erasure starts (its initial edit, before the first epoch) and what one round does (one epoch);
the :class:`Editor` it is handed (``RECEModule``) owns the state, the encodings and the writes, so a method is only
the choice of Eq. 3's rows and weights. One file per method; ``RECEModule(method=...)`` runs any of them::

    class MyMethod(ErasureMethod):
        name = "mine"
        def initial_edit(self, editor, concepts): ...   # editor.encoded / editor.edit
        def round(self, editor, concepts): ...          # optional: methods without rounds set has_rounds = False
        def settings(self): return {...}                # what the export's manifest records
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from torch import Tensor

from rece_lightning.data import ConceptSet
from rece_lightning.families import EncodedPrompt
from rece_lightning.validation import check_number

# lambda_2 and lambda of Eq. 7 weigh a d x d identity against sums of outer products of text embeddings, whose scale
# is ~1-1e3 for CLIP-like encoders: far above it, the edit or c' is numerically nothing (the solves see lambda * I).
MAX_REGULARISER = 1e6
REGULARISER_HINT = " (larger values make the edit numerically nothing; the reference uses 0.1, artists 1e-3 for reg)"


def check_regulariser(name: str, value: float) -> float:
    """lambda_2 (Eq. 2) or lambda (Eq. 7): finite, > 0, at most :data:`MAX_REGULARISER`."""
    return check_number(name, value, strictly_above=0, maximum=MAX_REGULARISER, hint=REGULARISER_HINT)


class Editor(Protocol):
    """What a method may use: the encodings, Eq. 2's preserve rows, Eq. 8 and Eq. 3 on the current state, and the
    state itself (``transform`` M with every K/V at ``W_orig M``; ``gram`` G = sum W_orig^T W_orig; ``hessian``
    M^T G M, Eq. 8's matrix), read-only."""

    transform: Tensor
    gram: Tensor
    hessian: Tensor

    def encoded(self, prompts: list[str]) -> list[EncodedPrompt]:
        """Encodings of ``prompts`` as the K/V read them (cached per base model)."""

    def encoded_uncached(self, prompts: list[str]) -> list[EncodedPrompt]:
        """Encodings of ``prompts``, not cached (an attack's throwaway candidates)."""

    def preserved(self, concepts: ConceptSet, with_guides: bool, with_preserve: bool = True) -> list[Tensor]:
        """Eq. 2's preserve rows: the concepts' ``preserve`` prompts (if ``with_preserve``), and their guides if
        ``with_guides``."""

    def derived_embeddings(self, concepts: ConceptSet, reg: float) -> dict[str, Tensor]:
        """Eq. 8 in the current state: c' per erased concept."""

    def edit(
        self,
        sources: list[Tensor],
        targets: list[Tensor],
        preserved: list[Tensor],
        *,
        lamb: float,
        erase_scale: float,
        preserve_scale: float,
        null_space: Tensor | None = None,
    ) -> None:
        """Compose one Eq. 3 edit (sources -> targets, preserving ``preserved``) into the state; ``null_space``
        confines the update to those directions (hard preservation)."""

    def compose(self, left: Tensor, right: Tensor) -> None:
        """Compose ``X = I + left @ right^T`` (d x k factors) into the state (``W_new = W_cur @ X``): an edit that is
        not Eq. 3's."""

    def words_near(self, prompts: list[str], count: int, exclude: set[str] | None = None) -> list[str]:
        """Whole vocabulary words nearest to the prompts' tokens (input token embeddings)."""


class ErasureMethod(ABC):
    """A closed-form erasure method: an initial edit, then (optionally) one round per epoch.

    Attributes:
        name: recorded as the export's ``method``.
        has_rounds: whether epochs do anything (UCE: no, its fit is ``max_epochs=0``).
    """

    name: ClassVar[str]
    has_rounds: ClassVar[bool] = True

    @abstractmethod
    def initial_edit(self, editor: Editor, concepts: ConceptSet) -> None:
        """The edit before the first epoch (Algorithm 1, line 6, for RECE)."""

    def round(self, editor: Editor, concepts: ConceptSet) -> None:
        """One epoch's edit on ``concepts`` (the epoch's batch)."""
        raise NotImplementedError(f"{self.name} has no rounds: fit it with trainer.max_epochs=0")

    softly_preserved: ClassVar[bool] = True  # whether preserve_concepts enter Eq. 2's soft term (hard methods: no)

    @property
    def probe_reg(self) -> float:
        """lambda of Eq. 7 for the derived embedding c' that probes and selectors look at (RECE: its own reg)."""
        return 0.1

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What the export's manifest records about the method (``hyperparameters``, ``token_modes``, ...)."""

    def settings_after(self, rounds: int) -> dict[str, Any]:
        """:meth:`settings` for the state after ``rounds`` rounds (an export of an earlier state than the last): a
        method that records something per round keeps only those rounds'."""
        return self.settings()

    def spec(self) -> dict[str, Any]:
        """The method as a ``class_path`` / ``init_args`` dict (checkpoints' hyper-parameters; :func:`from_spec`)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this method."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def from_spec(spec: ErasureMethod | Mapping[str, Any]) -> ErasureMethod:
    """A method from itself or from its :meth:`ErasureMethod.spec` (a checkpoint's record)."""
    if isinstance(spec, ErasureMethod):
        return spec
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise TypeError(f"method={spec!r} is not allowed: give an ErasureMethod (class_path / init_args in a config)")
    module_name, _, class_name = str(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ErasureMethod)):
        raise TypeError(f"method class_path={spec['class_path']!r} is not an ErasureMethod")
    return cls(**dict(spec.get("init_args") or {}))
