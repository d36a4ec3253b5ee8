"""Warn (and optionally stop) when the edited model collapses, a known failure of UCE-style edits at large scales."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.drift import relative_drift
from callbacks.probing import EveryState, ProbeSettings, check_probe_settings, generate_probes
from rece_lightning.validation import all_finite


def collapse_reasons(images: np.ndarray, min_std: float) -> list[str]:
    """Why a batch of (N, H, W, 3) probe images looks collapsed: NaN, constant or near-uniform images."""
    reasons = []
    for index, image in enumerate(images):
        if not np.isfinite(image).all():
            reasons.append(f"image {index} holds NaN/inf pixels")
        elif float(image.std()) < min_std:
            reasons.append(f"image {index} is near-uniform (pixel std {float(image.std()):.2g} < {min_std})")
    return reasons


class CollapseGuard(EveryState):
    """Check every state's probe images and K/V weights; warn in the log and TensorBoard when the model collapsed.

    Collapse: probe images that are NaN, constant or near-uniform; K/V weights that are not finite (the module stops
    the run on those, and this callback records why); or K/V weights blown far from the original (relative drift
    ``||W - W_orig|| / ||W_orig||`` above ``max_drift``), which too-large erase scales cause.

    Logged at step = RECE rounds applied: ``collapse/detected`` (0 or 1), ``collapse/min_image_std``,
    ``collapse/kv_drift``, and the reasons as TensorBoard text under ``collapse/reasons``.

    Args:
        min_std: probe images whose pixel standard deviation (pixels in [0, 1]) is below this count as uniform.
        max_drift: relative K/V drift above which the weights count as blown up (RECE's drift stays well below 1).
        stop_on_collapse: stop training at the first collapse.
        num_images, seed, num_inference_steps, guidance_scale, height, width: probe generation, as in ProbeImages.
    """

    def __init__(
        self,
        min_std: float = 0.02,
        max_drift: float = 10.0,
        stop_on_collapse: bool = False,
        probe: ProbeSettings | None = None,
    ) -> None:
        if not 0 <= min_std < 1:
            raise ValueError(f"min_std={min_std!r} is not allowed: pixel standard deviations lie in [0, 1)")
        if not max_drift > 0:
            raise ValueError(f"max_drift={max_drift!r} is not allowed: it must be > 0")
        self.min_std = min_std
        self.max_drift = max_drift
        self.stop_on_collapse = stop_on_collapse
        self.settings = check_probe_settings(probe)
        self.collapsed_states: list[int] = []

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        state = pl_module.rece_epochs_done
        weights = pl_module.kv_state()
        reasons = [f"K/V weight {n} is not finite" for n, w in weights.items() if not all_finite(w)]
        drift = relative_drift(weights, pl_module.original_kv)
        if drift > self.max_drift:
            reasons.append(f"K/V weights moved {drift:.3g}x their norm from the original (max_drift={self.max_drift})")
        min_std = float("nan")
        if not reasons:  # generating from non-finite weights would only add NaN images to the report
            probes = generate_probes(pl_module, self.settings)
            for kind, by_concept in (("derived", probes.derived), ("prompt", probes.prompt)):
                for concept, images in by_concept.items():
                    reasons += [f"{kind} probe of {concept!r}: {r}" for r in collapse_reasons(images, self.min_std)]
                    stds = [float(np.nan_to_num(image).std()) for image in images]
                    min_std = min(stds) if np.isnan(min_std) else min(min_std, *stds)
        metrics = {
            "collapse/detected": float(bool(reasons)),
            "collapse/min_image_std": min_std,
            "collapse/kv_drift": drift,
        }
        self._report(trainer, state, reasons, metrics)
        if reasons:
            self.collapsed_states.append(state)
            action = "stopping the run" if self.stop_on_collapse else "continuing (stop_on_collapse=False)"
            rank_zero_warn(
                f"CollapseGuard: the model collapsed at state {state} (after {state} RECE epochs): "
                f"{'; '.join(reasons[:3])}{' ...' if len(reasons) > 3 else ''}. Lower erase_scale or raise lamb; "
                f"{action}."
            )
        if self.stop_on_collapse and trainer.strategy.reduce_boolean_decision(bool(reasons), all=False):
            trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """The module stops the run on non-finite K/V weights; put the reason where the other warnings are."""
        if isinstance(exception, FloatingPointError) and trainer.is_global_zero:
            state = getattr(pl_module, "rece_epochs_done", 0)
            self.collapsed_states.append(state)
            self._report(trainer, state, [str(exception)], {"collapse/detected": 1.0})

    @staticmethod
    def _report(trainer: pl.Trainer, state: int, reasons: list[str], metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=state)
            if reasons and hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("collapse/reasons", "\n\n".join(reasons), global_step=state)
            logger.save()
