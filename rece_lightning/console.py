"""What a run prints: the known noise of the libraries underneath silenced, and a progress bar that counts rounds.

A RECE fit is a handful of closed-form rounds, so Lightning's "Epoch 3/3" (a 0-based index over ``max_epochs - 1``)
reads as "the last of 3" in a run of 4; the bar here says "round 4/4". Silenced, because the project causes them or
can configure them away: Lightning's litlogger tip, the "configure_optimizers returned None" warning (there is no
optimiser by design), diffusers' note that accelerate is missing (loading the small K/V-edited models needs none),
transformers' torchvision fallback notes (the pipeline's unused image processor), the loading bars of both (a
second per model), and on a resume the "checkpoint directory is not empty" warning (resuming into that folder is the
point).
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

NOISE = (
    "Tip: For seamless cloud",
    "Cannot initialize model with low cpu memory usage because `accelerate`",
    "requires torchvision (not installed); falling back",
)
_NOISY_LOGGERS = (
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "diffusers.models.modeling_utils",
    "diffusers.pipelines.pipeline_utils",
    "transformers.utils.import_utils",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


def silence_known_noise(resuming: bool = False) -> None:
    """Drop the messages listed in this module's docstring (idempotent)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components": a second per model
    transformers.utils.logging.disable_progress_bar()  # "Loading weights"
    warnings.filterwarnings("ignore", message=r".*configure_optimizers.*returned `None`")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _round_description(trainer) -> str:
    total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else trainer.max_steps
    return f"round {trainer.current_epoch + 1}/{total}"


class _NoVersion:
    """Drops the logger's version number (``v_num``) from the bar: the fit prints where its logs go."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RoundsRichProgressBar(_NoVersion, RichProgressBar):
    """Lightning's rich bar, its training line reading "round k/N" (1-based)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return _round_description(self.trainer)


class RoundsTQDMProgressBar(_NoVersion, TQDMProgressBar):
    """Lightning's tqdm bar, its training line reading "round k/N" (1-based)."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_round_description(trainer))


def rounds_progress_bar():
    """The progress bar Lightning would pick (rich where installed), counting rounds."""
    return RoundsRichProgressBar() if _RICH_AVAILABLE else RoundsTQDMProgressBar()
