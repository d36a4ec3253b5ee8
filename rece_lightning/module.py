"""``RECEModule``: a closed-form erasure method as a Lightning training run whose epochs are its rounds.

The method (:mod:`rece_lightning.methods`; RECE by default) makes an initial edit before the first epoch (RECE: the
UCE edit, Eq. 3) and one edit per epoch (RECE: derive the embedding c' that still regenerates each concept in the
edited model, Eq. 8, and erase c', Eq. 3). The "step" of an epoch is that closed-form update; there is no optimiser
and no gradient. The math lives in :mod:`rece_lightning.closed_form`, the choice of rows in the method, the model
family's layout in :mod:`rece_lightning.families`; this class owns the state and orchestrates.

State: the edited weights of every K/V matrix are ``W_orig @ transform`` with one d x d float64 ``transform`` (see
``closed_form``), so a checkpoint holds that matrix (4.7 MB for SD 1.x) instead of the U-Net.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from rece_lightning import closed_form, diffusion, distributed, kv_files, tokens
from rece_lightning.base_cache import BaseModelCache
from rece_lightning.data import ConceptDataModule, ConceptSet
from rece_lightning.diffusion import ModelSource
from rece_lightning.export import (
    BASE_IDENTITY_KEY,
    ERASED_IDENTITY_KEY,
    MANIFEST_NAME,
    TRANSFORM_KEY,
    check_pipeline_export_folder,
    kv_identity,
    save_erased,
    save_erased_pipeline,
)
from rece_lightning.families import EncodedPrompt, ModelFamily, family_of
from rece_lightning.files import check_writable_folder
from rece_lightning.lora import check_lora_rank, lora_layers, save_lora
from rece_lightning.methods import RECE, ErasureMethod, from_spec
from rece_lightning.model_card import check_repo_id, push_to_hub, write_model_card
from rece_lightning.precision import check_trainer_precision
from rece_lightning.single_file import save_single_file
from rece_lightning.validation import all_finite, check_choice

__all__ = ["RECEModule"]

MAX_SENSIBLE_ROUNDS = 50  # the paper uses 1-10; more is allowed, with a warning
EXPORT_FORMATS = ("kv", "diffusers", "lora", "single_file")
LOW_RANK_KEY = "rece_low_rank_factors"
NEGLIGIBLE_EDIT = 1e-9  # relative change of the transform under which an edit is reported as doing nothing


def _check_export_format(export_format: str) -> str:
    return check_choice("export_format", export_format, EXPORT_FORMATS)


class RECEModule(pl.LightningModule):
    """Erase concepts from a text-to-image model with a closed-form method: RECE (ECCV 2024) by default, its UCE edit
    and then one derive-erase round per epoch.

    Args:
        pretrained_model_name_or_path: hub id (e.g. ``CompVis/stable-diffusion-v1-4``) or local folder of a diffusers
            pipeline of a supported family (SD 1.x / 2.x, SDXL, PixArt-α / Σ), as with ``from_pretrained``; a
            single-file checkpoint (``.safetensors`` / ``.ckpt`` in the original layout, loaded with diffusers'
            ``from_single_file``); or a :class:`~rece_lightning.diffusion.ModelSource` that makes one
            (``rece_lightning.testing.TinyPipeline``).
        erase_concepts: concepts to erase (Eq. 2's set E), e.g. ``["nudity"]``.
        guide_concepts: destination of each concept (Eq. 2's c*): one for all or one per concept. " " is the empty
            prompt (the reference destination of "nudity"); artists use "art".
        preserve_concepts: concepts whose K/V outputs are kept (Eq. 2's set P), e.g. other artists' names.
        method: the erasure method and its hyper-parameters (:mod:`rece_lightning.methods`): ``RECE`` (default:
            lambda_1 = lambda_2 = 0.1, erase scale 1, Eq. 7's lambda 0.1) or ``UCE`` (``max_epochs=0``), as
            ``class_path`` / ``init_args`` in a config.
        dtype: dtype of the pipeline's weights: ``float32``, ``float16``, ``bfloat16`` or ``float64``. The solves run in
            float64.
        export_dir: where the erased model is written at the end of fit; ``{log_dir}`` stands for the run's log
            folder. ``null`` writes nothing.
        export_format: ``kv``: the erased K/V weights (``rece_kv.safetensors``) and their manifest, a few MB, applied
            with ``load_erased``; ``diffusers``: a complete pipeline folder (``save_pretrained``) that plain diffusers
            loads with ``from_pretrained`` and no project code, plus the same manifest; ``lora``: the edit as a LoRA
            on every K/V matrix (:mod:`rece_lightning.lora`), in diffusers' layout (``load_lora_weights``) and in
            kohya's (AUTOMATIC1111, Forge, ComfyUI); ``single_file``: for a single-file base, the same file with
            the erased K/V (:mod:`rece_lightning.single_file`).
        single_file_config: a single-file base's architecture: a diffusers folder (or hub id) with its configs and
            tokenizer, no weights needed; required offline.
        lora_rank: the LoRA export's rank: ``null`` (default) keeps the edit's own rank and reproduces it exactly; a
            smaller whole number keeps its top singular directions (smaller file, approximate; the manifest records
            the relative weight error).
        cache_dir: folder where the base model's Gram matrix and prompt encodings are kept across runs (keyed by a
            hash of its K/V weights), e.g. ``~/.cache/rece-lightning``; ``null``: in memory only, for this process.
        push_to_hub: a Hub repository id (``user/name``): the end-of-fit export, model card included, is uploaded
            there with ``huggingface_hub`` (private; log in first with ``huggingface-cli login``).

    Every export gets a model card (``README.md``, :mod:`rece_lightning.model_card`).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | ModelSource = "CompVis/stable-diffusion-v1-4",
        erase_concepts: list[str] | str = "nudity",
        guide_concepts: list[str] | str = " ",
        preserve_concepts: list[str] | None = None,
        method: ErasureMethod | None = None,
        dtype: str = "float32",
        export_dir: str | None = "{log_dir}/erased",
        export_format: str = "kv",
        lora_rank: int | None = None,
        cache_dir: str | None = None,
        push_to_hub: str | None = None,
        single_file_config: str | None = None,
    ) -> None:
        super().__init__()
        self.method = RECE() if method is None else from_spec(method)
        self._model_source = pretrained_model_name_or_path  # a ModelSource makes its model in setup
        path = diffusion.describe_model(pretrained_model_name_or_path)
        self.save_hyperparameters(ignore=["method", "pretrained_model_name_or_path"])
        self.hparams["pretrained_model_name_or_path"] = path
        self.hparams["method"] = self.method.spec()  # rebuilds the method in load_from_checkpoint
        self.concepts = ConceptSet.from_config(erase_concepts, guide_concepts, preserve_concepts)
        self.weight_dtype = diffusion.resolve_dtype(dtype)
        # a ModelSource is checked in setup, once it has made its model
        source = isinstance(pretrained_model_name_or_path, ModelSource)
        self.family: ModelFamily | None = None if source else diffusion.check_family(path, single_file_config)
        _check_export_format(export_format)
        if export_format == "single_file" and not diffusion.is_single_file(path):
            raise ValueError(
                f"export_format='single_file' writes the erased model in the layout of a single-file base, and "
                f"pretrained_model_name_or_path={path!r} is not one (.safetensors / .ckpt): use one of "
                f"{[f for f in EXPORT_FORMATS if f != 'single_file']}"
            )
        # d from the denoiser's safetensors header (no model loaded), where there is a rank to check against it
        shapes = kv_files.base_kv_shapes(path) if lora_rank is not None and not source else None
        check_lora_rank(lora_rank, next(iter(shapes.values()))[1] if shapes else None)
        if export_format == "lora" and self.family is not None and self.family.lora_pipeline is None:
            raise ValueError(
                f"export_format='lora' is not available for {self.family.label} ({path!r}): diffusers has no LoRA "
                f"loader for it; use one of {[f for f in EXPORT_FORMATS if f != 'lora']}"
            )
        if export_dir is not None and "{log_dir}" not in export_dir:
            if export_format == "diffusers":
                check_pipeline_export_folder("export_dir", export_dir)
            else:
                check_writable_folder("export_dir", export_dir)
        if cache_dir is not None:
            check_writable_folder("cache_dir", cache_dir)
        check_repo_id(push_to_hub)
        if push_to_hub is not None and export_dir is None:
            raise ValueError(f"push_to_hub={push_to_hub!r} needs an export: export_dir is null")
        self.automatic_optimization = False
        self.pipeline = None  # a diffusers pipeline, not an nn.Module: it stays out of state_dict and checkpoints
        self.original_kv: dict[str, Tensor] = {}
        self._workspace: closed_form.Workspace | None = None
        self._embeddings: dict[str, EncodedPrompt] = {}
        self.base_cache: BaseModelCache | None = None
        self._derived: tuple[int, dict[str, Tensor]] | None = None
        # (edits applied, left, right) with transform = I + left right^T, while that is cheaper to write; not in
        # checkpoints (a resumed run writes densely)
        self._factors: tuple[int, Tensor, Tensor] | None = None
        self._loaded_state = False  # a state restored before any pipeline was attached (load_from_checkpoint)
        self._base_identity: str | None = None
        self.recommended: RecommendedState | None = None  # set by a selector callback: the state to export
        self._write_edits = True  # whether edit() writes the weights (erase() defers the write to its end)

    # --- set-up --------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.pipeline is not None:
            return
        if self._trainer is not None:
            check_trainer_precision(self.trainer.precision, type(self).__name__)
            strategy = self.trainer.strategy
            if isinstance(strategy, DDPStrategy) and not isinstance(strategy, distributed.ReplicatedDDPStrategy):
                raise ValueError(
                    f"trainer.strategy={type(strategy).__name__} would wrap RECEModule in DistributedDataParallel, "
                    f"which refuses a module without trainable parameters: use strategy='{distributed.STRATEGY_NAME}' "
                    "(python train.py picks it for a RECE fit on several devices)"
                )
            if stage == "fit":
                self._check_rounds(self.trainer.max_epochs, self.trainer.max_steps, self.method)
        path = os.fspath(self._model_source)  # made now if it is a ModelSource
        single_file_config = self.hparams.get("single_file_config")
        self.family = diffusion.check_family(path, single_file_config)
        tokenizer = diffusion.load_tokenizer(path, single_file_config)
        if tokenizer is not None:  # a single file without a config: diffusers fetches its tokenizer with the model
            self._check_prompts(tokenizer)
        self.attach_pipeline(
            diffusion.load_pipeline(path, dtype=self.weight_dtype, single_file_config=single_file_config)
        )

    @staticmethod
    def _check_rounds(max_epochs: int | None, max_steps: int, method: ErasureMethod | None = None) -> int:
        """The number of derive-erase rounds must be said (Lightning would run 1000) and sane; returns it.

        Each epoch is one closed-form step, so ``max_steps`` alone (Lightning then sets ``max_epochs=-1``) counts
        rounds too.
        """
        if max_epochs in (None, -1) and max_steps not in (None, -1):
            rounds = max_steps
        else:
            rounds = max_epochs
        if rounds is None:
            raise ValueError(
                "trainer.max_epochs is not set: give the number of derive-erase rounds, e.g. --trainer.max_epochs=5 "
                "(paper: 3-5 for nudity, 1-10 for artists); Lightning's default of 1000 rounds would erase far more "
                "than the concept (each round is one step, so --trainer.max_steps=N works too)"
            )
        if rounds < 0:
            raise ValueError(
                f"trainer.max_epochs={rounds} is not allowed for RECE: give the number of derive-erase rounds, "
                ">= 0 (0 is the UCE edit alone), as max_epochs or max_steps"
            )
        if rounds > 0 and method is not None and not method.has_rounds:
            raise ValueError(
                f"trainer.max_epochs={rounds} is not allowed for method {method.name}: it has no rounds, only its "
                "initial edit; give trainer.max_epochs=0"
            )
        if rounds > MAX_SENSIBLE_ROUNDS:
            rank_zero_warn(
                f"trainer.max_epochs={rounds}: the paper uses 1-10 derive-erase rounds. Each round edits up to one "
                "more direction per token of the text space, so after a few dozen rounds the K/V projections lose "
                "unrelated concepts too (watch drift/preservation in TensorBoard)"
            )
        return rounds

    def attach_pipeline(self, pipeline) -> None:
        """Take ``pipeline`` (unedited) as the model to erase from: keep its original K/V and their Gram matrix.

        A module restored by ``RECEModule.load_from_checkpoint`` keeps the restored state and writes its weights into
        ``pipeline``; otherwise the state starts unedited.
        """
        self.pipeline = pipeline
        self.family = family_of(pipeline)
        self._embeddings.clear()
        self._near: dict[tuple, list[str]] = {}
        self._derived = None
        self._base_identity = None
        # The base K/V are the parameters' own tensors until the first write gives the parameters storage of their
        # own (_write): no copy of all K/V up front (77 MB on SD 1.4, the largest share of a warm erasure's time).
        # A copy an earlier module on the same base kept stands in for them, and the parameters are written in place.
        live = {name: w.detach() for name, w in diffusion.kv_weights(pipeline).items()}
        self.base_cache = BaseModelCache(live, self.hparams.cache_dir)
        self.original_kv = self.base_cache.base_weights(live) or live
        device = next(iter(self.original_kv.values())).device
        gram = self.base_cache.gram(lambda: closed_form.gram_matrix(list(self.original_kv.values()))).to(device).clone()
        self.register_buffer("gram", gram, persistent=False)  # a property of the base model, recomputed on load
        if self._loaded_state:
            self._loaded_state = False
            if self.transform.shape != gram.shape:
                raise ValueError(
                    f"the checkpoint's transform is {tuple(self.transform.shape)} but this pipeline's K/V matrices "
                    f"take d={gram.shape[0]} inputs: it was made for another base model"
                )
            self._check_checkpoint_base()
            for name in (TRANSFORM_KEY, "hessian", "edits_applied"):
                self.register_buffer(name, getattr(self, name).to(device))
            eye = torch.eye(*gram.shape, dtype=torch.float64, device=device)
            self._write(self.transform, previous=eye, factors=self._current_factors())
            return
        unedited = closed_form.SharedState.unedited(gram)
        # The state: checkpoints hold these two d x d matrices (the hessian too, so a resumed run is bit-exact).
        self.register_buffer(TRANSFORM_KEY, unedited.transform)
        self.register_buffer("hessian", unedited.hessian)
        self.register_buffer("edits_applied", torch.zeros((), dtype=torch.long, device=device))
        self._factors = (0, unedited.left, unedited.right)  # transform = I + left right^T while cheaper to write

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Also before any pipeline is attached (``RECEModule.load_from_checkpoint``): the state's buffers are made
        from the checkpoint, and :meth:`attach_pipeline` (or ``setup``) then writes its weights."""
        if self.pipeline is None and TRANSFORM_KEY in state_dict and TRANSFORM_KEY not in self._buffers:
            for name in (TRANSFORM_KEY, "hessian", "edits_applied"):
                if name in state_dict:
                    self.register_buffer(name, torch.empty_like(state_dict[name], device="cpu"))
            self._loaded_state = True
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def base_identity(self) -> str:
        """:func:`~rece_lightning.export.kv_identity` of the base K/V (computed on first use)."""
        if self._base_identity is None:
            self._base_identity = kv_identity(self.original_kv)
        return self._base_identity

    def _check_prompts(self, tokenizer) -> None:
        """Every concept, guide and preserved prompt fits the text encoder and is made of words its tokenizer knows."""
        limit = self.family.max_length(tokenizer) if self.family is not None else tokenizer.model_max_length
        for prompt in self.concepts.prompts:
            unknown = tokens.unknown_words(tokenizer, prompt)
            if unknown:
                raise ValueError(
                    f"concept {prompt!r}: the tokenizer of {self.hparams.pretrained_model_name_or_path!r} does not "
                    f"know {unknown} (it reads them as {tokenizer.unk_token!r}, so the edit would erase that token): "
                    f"use words of its vocabulary ({len(tokenizer)} tokens)"
                )
            count = tokens.token_count(tokenizer, prompt)
            if count > limit:
                raise ValueError(
                    f"concept {prompt!r} is {count} tokens long (special tokens included); the text encoder takes "
                    f"at most {limit}: shorten it"
                )

    def on_fit_start(self) -> None:
        self._announce_outputs()
        self.pipeline.to(self.device)
        self.original_kv = {name: w.to(self.device) for name, w in self.original_kv.items()}
        if int(self.edits_applied) == 0:
            started = time.perf_counter()
            self.apply_uce()
            rank_zero_info(f"{self.method.name}: initial edit done in {time.perf_counter() - started:.3f} s")
        else:  # resumed from a checkpoint: the transform was restored, the U-Net still holds the original weights
            self._write(
                self.transform,
                previous=torch.eye(*self.transform.shape, dtype=torch.float64, device=self.device),
                factors=self._current_factors(),
            )

    # --- the algorithm -------------------------------------------------------------------------------------------

    def encoded(self, prompts: list[str]) -> list[EncodedPrompt]:
        """Text-encoder outputs of ``prompts``, on the U-Net's device; each distinct prompt is encoded once per base
        model (batched; kept across runs with ``cache_dir``)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            found = self.base_cache.encodings(
                self.pipeline, missing, lambda texts: self.family.encode(self.pipeline, texts)
            )
            self._embeddings.update(zip(missing, self._on_unet_device(found), strict=True))
        return [self._embeddings[p] for p in prompts]

    def encoded_uncached(self, prompts: list[str]) -> list[EncodedPrompt]:
        """Text-encoder outputs of ``prompts`` on the U-Net's device, kept nowhere: a search's thousands of throwaway
        candidates would otherwise fill the memory and disk caches."""
        return self._on_unet_device(self.family.encode(self.pipeline, prompts))

    def _on_unet_device(self, encodings: list[EncodedPrompt]) -> list[EncodedPrompt]:
        device = self.family.denoiser(self.pipeline).device
        return [
            EncodedPrompt(e.embedding.to(device), e.length, None if e.pooled is None else e.pooled.to(device))
            for e in encodings
        ]

    def preserved(self, concepts: ConceptSet, with_guides: bool = True, with_preserve: bool = True) -> list[Tensor]:
        """Rows of Eq. 2's preserve term: the guides (once per concept, as in the reference code; if ``with_guides``)
        and ``preserve`` (if ``with_preserve``: a hard-preserving method keeps those exactly instead).

        A prompt listed k times enters once, scaled by sqrt(k): the same sum of outer products with 1/k of the rows
        (1000 concepts with the guide " " would otherwise stack 77,000 identical rows).
        """
        guides = list(concepts.guides) if with_guides else []
        counts = Counter(guides + (list(concepts.preserve) if with_preserve else []))
        return [  # scaled in float64: a float32 product would perturb the rows by 1e-7, amplified by cond(B) ~ 1e6
            e.embedding if counts[p] == 1 else e.embedding.to(torch.float64) * math.sqrt(counts[p])
            for p, e in zip(counts, self.encoded(list(counts)), strict=True)
        ]

    def words_near(self, prompts: list[str], count: int, exclude: set[str] | None = None) -> list[str]:
        """The ``count`` whole words of the tokenizer's vocabulary nearest to any token of ``prompts`` (cosine of the
        text encoder's input token embeddings; letters only, ``exclude`` and the prompts' own words left out): the
        candidates of neighbour preservation and of vocabulary attacks, without encoding the whole vocabulary."""
        key = (tuple(prompts), count, tuple(sorted(exclude or ())))
        if key in self._near:  # a property of the base model's vocabulary: every round asks the same
            return self._near[key]
        table = self.family.token_embeddings(self.pipeline).detach()
        self._near[key] = tokens.nearest_words(self.family.tokenizer(self.pipeline), table, prompts, count, exclude)
        return self._near[key]

    def apply_uce(self, write: bool = True) -> None:
        """The method's initial edit (RECE: Algorithm 1, line 6, the preliminary UCE edit)."""
        self._write_edits = write
        try:
            self.method.initial_edit(self, self.concepts)
        finally:
            self._write_edits = True

    def derived_embeddings(self, concepts: ConceptSet | None = None, reg: float | None = None) -> dict[str, Tensor]:
        """Eq. 8 for every concept in the current state: c' (T, d) in float64, keyed by concept; ``reg``: Eq. 7's
        lambda (default: the method's ``probe_reg``, RECE's own ``reg``).

        Cached per state and ``reg``, so callbacks that look at c' before an epoch and the epoch itself share one
        computation.
        """
        concepts = concepts or self.concepts
        reg = self.method.probe_reg if reg is None else reg
        key = (int(self.edits_applied), reg)
        if self._derived is None or self._derived[0] != key or not set(concepts.erase) <= set(self._derived[1]):
            state_now = closed_form.SharedState(self.transform, self.hessian)
            # All concepts in one solve (one factorisation of the d x d system, however many concepts); kept in
            # float64: c' is erased next, and rounding it to the encoder's dtype costs ~1e-6.
            stacked = torch.stack([e.embedding for e in self.encoded(list(concepts.erase))]).to(torch.float64)
            solved = closed_form.derive_embedding_from_state(
                state_now, self.gram, stacked, reg=reg, workspace=self._workspace_for(self.transform)
            )
            derived = dict(zip(concepts.erase, solved.unbind(0), strict=True))
            self._derived = (key, derived)
        return {name: self._derived[1][name] for name in concepts.erase}

    def derive_and_erase(self, concepts: ConceptSet, write: bool = True) -> None:
        """One round of the method on ``concepts`` (RECE: Algorithm 1, lines 8-16, derive c' by Eq. 8 and erase it
        by Eq. 3).

        RECE's round needs only the transform and G, so ``write=False`` may leave the weights for later.
        """
        self._write_edits = write
        try:
            self.method.round(self, concepts)
        finally:
            self._write_edits = True

    def erase(self, epochs: int) -> None:
        """The whole of Algorithm 1 without a Trainer (library use, benchmarks): UCE, then ``epochs`` rounds.

        The U-Net's weights are written once, at the end; if they come out non-finite, nothing changes.
        """
        start, start_hessian, edits = self.transform.clone(), self.hessian.clone(), int(self.edits_applied)
        start_factors = self._factors
        if edits == 0:
            self.apply_uce(write=False)
        for _ in range(epochs):
            self.derive_and_erase(self.concepts, write=False)
        try:
            self._write(self.transform, previous=start, factors=self._current_factors())
        except FloatingPointError:
            self.transform.copy_(start)
            self.hessian.copy_(start_hessian)
            self._factors = start_factors
            self.edits_applied.fill_(edits)
            raise

    def training_step(self, batch: ConceptSet, batch_idx: int) -> None:
        """One epoch = one derive-erase round on the batch's concepts (on every process: the state is replicated)."""
        self.derive_and_erase(batch)
        distributed.check_replicated(self.trainer, self.transform, "the RECE transform")
        self._count_closed_form_step()

    def _count_closed_form_step(self) -> None:
        # Lightning counts `global_step` in optimiser steps; without one it stays 0, and ModelCheckpoint, loggers and
        # max_steps would see no progress. The closed-form update is this epoch's step, so count it as one.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

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
        """Compose one Eq. 3 edit (``W_new = W_cur @ X``) into the state and the weights (unless a caller defers the
        write, as :meth:`erase` does); refuse non-finite results."""
        workspace = self._workspace_for(self.transform)
        edited = closed_form.replace_edit(
            closed_form.SharedState(self.transform, self.hessian, *self._current_factors()),
            self.gram,
            sources,
            targets,
            preserved,
            lamb=lamb,
            erase_scale=erase_scale,
            preserve_scale=preserve_scale,
            null_space=null_space,
            workspace=workspace,
        )
        self._check_finite(edited, advice="; lower erase_scale or raise lamb")
        difference = torch.sub(edited.transform, self.transform, out=workspace.scratch)
        change = torch.linalg.matrix_norm(difference) / torch.linalg.matrix_norm(self.transform)
        if float(change) < NEGLIGIBLE_EDIT:
            rank_zero_warn(
                f"{self.method.name} edit {int(self.edits_applied)} changes the K/V by {float(change):.1e} "
                f"(relative): numerically nothing: the erase term (erase_scale={erase_scale!r}) is outweighed by "
                f"lamb={lamb!r} and the preserve term; the reference uses erase_scale=1, lamb=0.1"
            )
        self._commit(edited)

    def _check_finite(self, edited: closed_form.SharedState, advice: str = "") -> None:
        """Refuse an edit whose state is non-finite, before anything is written."""
        if not (all_finite(edited.transform) and all_finite(edited.hessian)):
            raise FloatingPointError(
                f"{self.method.name} edit {int(self.edits_applied)} gives a non-finite transform{advice}. "
                "The run stops and nothing is exported."
            )

    def _commit(self, edited: closed_form.SharedState) -> None:
        """Make ``edited`` the state: the weights (unless a caller defers the write, as :meth:`erase` does), the
        transform and hessian, the edit count and the low-rank factors the next write may use."""
        if self._write_edits:
            self._write(edited.transform, previous=self.transform, factors=(edited.left, edited.right))
        self.transform.copy_(edited.transform)
        self.hessian.copy_(edited.hessian)
        self.edits_applied += 1
        self._factors = None if edited.left is None else (int(self.edits_applied), edited.left, edited.right)

    def compose(self, left: Tensor, right: Tensor) -> None:
        """Compose ``X = I + left @ right^T`` (d x k factors) into the state (``W_new = W_cur @ X`` for every K/V) and
        the weights, for a method whose edit is not Eq. 3's (RECE-P's projection); refuse non-finite results."""
        if left.shape != right.shape or left.ndim != 2 or left.shape[0] != self.transform.shape[0]:
            raise ValueError(
                f"left {tuple(left.shape)} and right {tuple(right.shape)} must be two (d={self.transform.shape[0]}, k) "
                "factors"
            )
        edited = closed_form.compose_low_rank(closed_form.SharedState(self.transform, self.hessian), left, right)
        self._check_finite(edited)
        self._commit(edited)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BASE_IDENTITY_KEY] = self.base_identity  # load_erased refuses the transform on another base
        # The low-rank factors decide how the weights are rounded when written: kept, a resumed run is bit-exact.
        if self._factors is not None:
            edits, left, right = self._factors
            checkpoint[LOW_RANK_KEY] = {"edits": edits, "left": left.to("cpu"), "right": right.to("cpu")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_base = checkpoint.get(BASE_IDENTITY_KEY)
        if self.pipeline is not None:  # resuming a fit: the base is loaded already
            self._check_checkpoint_base()
        saved = checkpoint.get(LOW_RANK_KEY)
        self._factors = None if saved is None else (saved["edits"], saved["left"], saved["right"])

    def _check_checkpoint_base(self) -> None:
        """Refuse a checkpoint's state on other base weights than it was made from (it would compound or misfit)."""
        recorded = getattr(self, "_checkpoint_base", None)
        if recorded is not None and recorded != self.base_identity:
            raise ValueError(
                f"the checkpoint was made from other base weights (K/V identity {recorded[:12]}…) than "
                f"{self.hparams.pretrained_model_name_or_path!r} holds ({self.base_identity[:12]}…): load the base it "
                "was made from"
            )

    def _workspace_for(self, state: Tensor) -> closed_form.Workspace:
        """The edits' reusable d x d buffers, made on first use and again when the module moved to another device."""
        if self._workspace is None or not self._workspace.fits(state):
            self._workspace = closed_form.Workspace.for_dim(state.shape[0], state.device)
        return self._workspace

    def _current_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """The low-rank factors of the current transform, if they are known for this very state."""
        if self._factors is None or self._factors[0] != int(self.edits_applied):
            return None, None
        return self._factors[1], self._factors[2]

    def weights_for(self, transform: Tensor) -> dict[str, Tensor]:
        """The K/V weights ``W_orig @ transform`` of the state that ``transform`` describes, in the model's dtype."""
        return {name: closed_form.apply_transform(w, transform) for name, w in self.original_kv.items()}

    @torch.no_grad()
    def _write(
        self, transform: Tensor, previous: Tensor, factors: tuple[Tensor | None, Tensor | None] = (None, None)
    ) -> None:
        """Write ``W_orig @ transform`` into the U-Net's K/V parameters in place, one matrix at a time.

        A matrix that comes out non-finite in the model's dtype (fp16 overflow) restores ``W_orig @ previous`` in the
        matrices already written and raises: the U-Net is left as it was.
        """
        live = self.kv_state()
        converted: dict[tuple, tuple] = {}  # the transform in each (device, dtype) the products run in, made once
        written = []
        gave_storage = False
        for name, original in self.original_kv.items():
            key = (original.device, closed_form.product_dtype(original))
            if key not in converted:
                left, right = factors
                if left is not None and right is not None:
                    # directions below the product dtype's resolution change nothing it can represent
                    left, right = closed_form.compact_factors(left, right, rtol=torch.finfo(key[1]).eps)
                converted[key] = tuple(
                    None if t is None else t.to(device=key[0], dtype=key[1]) for t in (transform, left, right)
                )
            if live[name].data_ptr() == original.data_ptr():  # still the base weights: never overwrite those
                live[name].data = torch.empty_like(original)
                gave_storage = True
            # straight into the parameter's storage (float16 weights: through a float32 product and one copy)
            weight = closed_form.apply_transform(original, *converted[key], out=live[name])
            if not all_finite(weight):
                for done in (*written, name):
                    live[done].copy_(closed_form.apply_transform(self.original_kv[done], previous))
                raise FloatingPointError(
                    f"{self.method.name} edit {int(self.edits_applied)} gives non-finite {self.hparams.dtype} K/V "
                    "weights in "
                    f"{name!r}; lower erase_scale or raise lamb. The run stops and nothing is exported."
                )
            written.append(name)
        if self.base_cache is not None and gave_storage:  # the base K/V now live in storage no module writes
            self.base_cache.keep_base_weights(self.original_kv)

    # --- what callbacks and users read ---------------------------------------------------------------------------

    @property
    def rece_epochs_done(self) -> int:
        """Derive-erase rounds applied so far (the UCE edit not counted)."""
        return max(int(self.edits_applied) - 1, 0)

    def kv_state(self) -> dict[str, Tensor]:
        """The live K/V weights of the U-Net (not copies)."""
        return diffusion.kv_weights(self.pipeline)

    def manifest(self, rounds: int | None = None) -> dict[str, Any]:
        """What an export of the current state (``rounds``: of the state after that many RECE epochs) records about
        how it was made."""
        hparams = dict(self.hparams)
        rounds = self.rece_epochs_done if rounds is None else rounds
        return {
            "method": self.method.name,
            "base_model": hparams["pretrained_model_name_or_path"],
            BASE_IDENTITY_KEY: self.base_identity,
            "erase_concepts": list(self.concepts.erase),
            "guide_concepts": list(self.concepts.guides),
            "preserve_concepts": list(self.concepts.preserve),
            **self.method.settings_after(rounds),
            "dtype": hparams["dtype"],
            "rece_epochs": rounds,
        }

    def export(
        self,
        folder: str | Path,
        export_format: str | None = None,
        transform: Tensor | None = None,
        **extra: Any,
    ) -> Path:
        """Write a state and its manifest (plus ``extra`` fields) to ``folder`` in ``export_format`` (default: the
        module's): the K/V safetensors (returns its path) or a whole diffusers pipeline (returns the folder).

        ``transform``: the state to write (default: the current one), e.g. an earlier state a selector chose; the
        U-Net is left holding the current state. Every export gets its model card (``README.md``).
        """
        path = self._export(folder, export_format, transform, **extra)
        write_model_card(path if path.is_dir() else path.parent)
        return path

    def _export(self, folder: str | Path, export_format: str | None, transform: Tensor | None, **extra: Any) -> Path:
        export_format = _check_export_format(export_format or self.hparams.export_format)
        state = self.transform if transform is None else transform.to(self.transform.device)
        weights = self.kv_state() if transform is None else self.weights_for(state)
        manifest = {**self.manifest(extra.get("rece_epochs")), ERASED_IDENTITY_KEY: kv_identity(weights), **extra}
        if export_format == "lora":
            check_lora_rank(self.hparams.get("lora_rank"), state.shape[0])
            return save_lora(
                folder, self.family, lora_layers(self.original_kv, state, self.hparams.get("lora_rank")), manifest
            )
        if export_format == "single_file":
            config = self.family.denoiser(self.pipeline).config
            return save_single_file(
                folder,
                self.hparams.pretrained_model_name_or_path,
                weights,
                lambda name: self.family.single_file_kv_key(name, config),
                manifest,
            )
        if export_format == "kv":
            return save_erased(folder, weights, manifest)
        if transform is None:
            return save_erased_pipeline(folder, self.pipeline, manifest)
        current = {name: w.detach().clone() for name, w in self.kv_state().items()}
        diffusion.write_kv_weights(self.pipeline, weights)
        try:
            return save_erased_pipeline(folder, self.pipeline, manifest)
        finally:
            diffusion.write_kv_weights(self.pipeline, current)

    def recommend(self, state: int, transform: Tensor, reason: str, source: str) -> None:
        """A selector's choice of the state to export (``export_dir`` gets it at the end of fit; the last state, if
        it differs, goes beside it as ``<export_dir>_last``)."""
        self.recommended = RecommendedState(state, transform.detach().to("cpu", copy=True), reason, source)

    # --- Lightning plumbing --------------------------------------------------------------------------------------

    def train_dataloader(self):
        return ConceptDataModule.from_concepts(self.concepts).train_dataloader()

    def configure_optimizers(self) -> None:
        return None  # closed-form updates: "Fit will run without any optimizer"

    def export_folder(self) -> Path | None:
        """Where the fit's export goes (``export_dir`` with ``{log_dir}`` filled in), or None."""
        target = self.hparams.export_dir
        if target is None:
            return None
        return Path(target.format(log_dir=self.trainer.log_dir or self.trainer.default_root_dir))

    def _announce_outputs(self) -> None:
        checkpoints = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        rounds = self._check_rounds(self.trainer.max_epochs, self.trainer.max_steps, self.method)
        rank_zero_info(
            f"RECE: {rounds} derive-erase rounds after the UCE edit; logs in "
            f"{self.trainer.log_dir or 'nowhere (no logger)'}; checkpoints in {checkpoints or 'none'}; export to "
            f"{self.export_folder() or 'nowhere (export_dir=null)'} (the state a selector recommends, else the last)"
        )

    def on_fit_end(self) -> None:
        folder = self.export_folder()
        if folder is None or not self.trainer.is_global_zero or self.trainer.interrupted:
            return
        choice = self.recommended
        last = folder.with_name(f"{folder.name}_last")
        if choice is None or choice.state == self.rece_epochs_done:
            path = self.export(folder)
            if (last / MANIFEST_NAME).is_file():  # an earlier run's last state: it would pass for this run's
                shutil.rmtree(last)
            what = f"the last state ({self.rece_epochs_done} RECE epochs)"
            if choice is not None:
                what += f", the one {choice.source} recommends"
            rank_zero_info(f"RECE: {what} written to {path}")
        else:
            path = self.export(folder, transform=choice.transform, rece_epochs=choice.state, selection=choice.reason)
            last_path = self.export(last)
            rank_zero_info(
                f"RECE: state {choice.state} ({choice.source}: {choice.reason}) written to {path}; the last state "
                f"({self.rece_epochs_done} RECE epochs) to {last_path}"
            )
        if self.hparams.get("push_to_hub"):
            url = push_to_hub(folder, self.hparams.push_to_hub)
            rank_zero_info(f"RECE: {folder} uploaded to the Hub: {url}")


@dataclass(frozen=True)
class RecommendedState:
    """The state a callback recommends exporting: after ``state`` RECE epochs, with its transform and why."""

    state: int
    transform: Tensor
    reason: str
    source: str
