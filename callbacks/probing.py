"""Probe images of a RECE state: what the derived embedding c' (Eq. 8) and the plain concept prompt generate.

Shared by the probe, selection and collapse callbacks, each of which works alone; when several run with equal
``ProbeSettings``, the images of one model state are generated once (cached per module, state and settings).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from tqdm.auto import tqdm

from rece_lightning.distributed import sharded_map
from rece_lightning.families import family_of

_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ProbeSettings:
    """Fixed generation settings, so that probe images of different epochs differ only by the model state."""

    num_images: int = 1
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512

    def __post_init__(self) -> None:
        for name in ("num_images", "num_inference_steps", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
        if self.height % 8 or self.width % 8:
            raise ValueError(
                f"height={self.height}, width={self.width}: both must be multiples of 8 (the VAE's factor)"
            )
        if not isinstance(self.guidance_scale, (int, float)) or not np.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} is not allowed: it must be a finite number")

    def sampler(self) -> dict:
        """The pipeline-call keywords of these settings (images as float numpy arrays)."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "output_type": "np",
        }


def check_probe_settings(probe: ProbeSettings | None) -> ProbeSettings:
    """The callbacks' ``probe`` argument: a :class:`ProbeSettings` (default values if None)."""
    if probe is None:
        return ProbeSettings()
    if not isinstance(probe, ProbeSettings):
        raise TypeError(f"probe={probe!r} is not allowed: give a ProbeSettings (num_images, seed, ... in a config)")
    return probe


@dataclass(frozen=True)
class Probes:
    """Images (N, H, W, 3) in [0, 1] per concept: from c' (``derived``) and from the concept's own prompt."""

    state: int  # RECE rounds applied when the images were made (0 = right after the UCE edit)
    derived: dict[str, np.ndarray]
    prompt: dict[str, np.ndarray]


@torch.no_grad()
def generate_probes(module, settings: ProbeSettings) -> Probes:
    """One batched pipeline call over all concepts x {c', prompt}; K/V weights and global RNG are left untouched."""
    state = int(module.edits_applied)
    cached = _MEMO.get(module)
    if cached is None or cached[0] != state:  # a new state: the images of the previous one are not needed again
        cached = (state, {})
        _MEMO[module] = cached
    if settings in cached[1]:
        return cached[1][settings]
    pipeline = module.pipeline
    family = family_of(pipeline)
    concepts = list(module.concepts.erase)
    derived = module.derived_embeddings()
    encoded = module.encoded(concepts)
    rows = [derived[c] for c in concepts] + [e.embedding for e in encoded]
    batch = torch.stack(rows).repeat_interleave(settings.num_images, dim=0)
    # c' is generated with its concept's attention mask, where the family masks padding (PixArt)
    lengths = [e.length for e in encoded] * 2
    lengths = [length for length in lengths for _ in range(settings.num_images)]
    # SDXL also conditions on a pooled embedding: c' and the prompt both get the concept's own (README, "SDXL").
    pooled = None
    if encoded[0].pooled is not None:
        pooled = torch.stack([e.pooled for e in encoded] * 2).repeat_interleave(settings.num_images, dim=0)
    trainer = getattr(module, "_trainer", None)
    show = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
    pipeline.set_progress_bar_config(
        disable=not show, leave=False, desc=f"probes of state {module.rece_epochs_done} ({batch.shape[0]} images)"
    )

    def run(indices: list[int]) -> np.ndarray:
        # Image i of every concept and of c' starts from the same noise (seed + i), so rows compare like for like,
        # whichever process generates it.
        generators = [
            torch.Generator(device=pipeline.device).manual_seed(settings.seed + index % settings.num_images)
            for index in indices
        ]
        return family.generate(
            pipeline,
            embeds=batch[indices],
            pooled=None if pooled is None else pooled[indices],
            lengths=[lengths[i] for i in indices],
            generator=generators,
            **settings.sampler(),
        ).images

    # On several processes each generates its share of the rows and all get every image.
    images = sharded_map(trainer, range(batch.shape[0]), run, (settings.height, settings.width, 3))
    pipeline.set_progress_bar_config(disable=True)
    images = images.reshape(2, len(concepts), settings.num_images, *images.shape[1:])
    probes = Probes(
        state=module.rece_epochs_done,
        derived={c: images[0, i] for i, c in enumerate(concepts)},
        prompt={c: images[1, i] for i, c in enumerate(concepts)},
    )
    cached[1][settings] = probes
    return probes


def image_grid(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> one (H, N*W, 3) row, for TensorBoard."""
    return np.concatenate(list(images), axis=1)


def slug(text: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in text.strip().lower())
    return cleaned.strip("_") or "blank"


class EveryState(pl.Callback):
    """Calls ``observe`` for every RECE state: right after the UCE edit (train start), then after each epoch's
    derive-erase round, and ``finish`` once the states are over. Subclasses observe and decide; they never change
    the module's weights.

    A fit of ``max_epochs=0`` (the UCE edit alone) never enters Lightning's training loop, so neither train hook
    runs; its one state is observed, and ``finish`` called, at the end of fit instead.

    On several processes ``observe`` runs on every one of them (probe generation is shared out, see
    :func:`generate_probes`); files and logs come from rank 0 (Lightning's loggers are rank-zero only), and
    decisions are reduced across processes."""

    _states_observed = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._states_observed = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._observe(trainer, pl_module, after_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._observe(trainer, pl_module, after_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._states_observed == 0 and not trainer.interrupted:  # the training loop was skipped (max_epochs=0)
            self._observe(trainer, pl_module, after_epoch=False)
            self.finish(trainer, pl_module)

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        self.observe(trainer, pl_module, after_epoch)
        self._states_observed += 1

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        raise NotImplementedError

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called once after the last state was observed."""


@torch.no_grad()
def generate_prompt_images(
    pl_module, prompts: list[str], seeds: list[int], settings: ProbeSettings, batch_size: int, description: str
) -> np.ndarray:
    """The image of each prompt (seed ``seeds[i]``) at the module's current state, with the probes' sampler; on
    several processes each makes its share and every process gets all of them, in order."""
    pipeline = pl_module.pipeline
    trainer = pl_module.trainer
    progress = tqdm(
        total=len(prompts),
        desc=description,
        unit="image",
        leave=False,
        disable=trainer.progress_bar_callback is None or not trainer.is_global_zero,
    )

    def run(indices: list[int]) -> np.ndarray:
        images = []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            generators = [torch.Generator(device=pipeline.device).manual_seed(int(seeds[i])) for i in chunk]
            images.append(pipeline([prompts[i] for i in chunk], generator=generators, **settings.sampler()).images)
            progress.update(len(chunk))
        return np.concatenate(images)

    images = sharded_map(trainer, prompts, run, (settings.height, settings.width, 3))
    progress.close()
    return images
