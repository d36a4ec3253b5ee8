"""What the erasure spares, per RECE state: the share of other concepts' images that still show them."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np

from callbacks.probing import EveryState, ProbeSettings, check_probe_settings, generate_prompt_images
from rece_lightning.evaluation.scoring import ImageScorer, check_scorer
from rece_lightning.evaluation.statistics import interval
from rece_lightning.validation import check_positive_int


class ConceptPreservation(EveryState):
    """Log, for every state, how well the concepts that must be kept still appear: each class ``c`` of ``prompts``
    (class -> prompts that name it) is kept in an image of its prompts when ``scorer`` finds ``c`` there.

    Logged at step = RECE rounds applied: ``val/kept_rate`` (pooled over the classes; its 95 % Wilson interval in
    :attr:`history`) and ``val/kept/<class>``. The image-level counterpart of ``ParameterDrift``'s K/V
    ``drift/preservation``, for any detector; ``train.py sweep`` reports it per state.

    Args:
        scorer: the detector of the kept classes, e.g. ``ToyWorldScorer(classes=[green, blue, yellow])``.
        prompts: kept class -> prompts that should draw it; prompt ``i`` (in order over the classes) uses seed
            ``probe.seed + i``.
        probe: the sampler (:class:`~callbacks.probing.ProbeSettings`; ``num_images`` is not used).
        batch_size: prompts per pipeline call.
    """

    def __init__(
        self,
        scorer: ImageScorer,
        prompts: dict[str, list[str]],
        probe: ProbeSettings | None = None,
        batch_size: int = 8,
    ) -> None:
        self.scorer = check_scorer(scorer, type(self).__name__)
        if not prompts:
            raise ValueError("prompts={} is not allowed: give kept class -> prompts that name it")
        for label, texts in prompts.items():
            if label not in self.scorer.classes:
                raise ValueError(
                    f"prompts has class {label!r}, which the scorer does not detect: its classes are "
                    f"{list(self.scorer.classes)}"
                )
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"prompts[{label!r}]={texts!r} is not allowed: give non-empty prompts")
        self.prompts = {label: list(texts) for label, texts in prompts.items()}
        self.settings = check_probe_settings(probe)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.history: list[dict] = []

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        labels = [label for label, texts in self.prompts.items() for _ in texts]
        texts = [text for texts in self.prompts.values() for text in texts]
        seeds = [self.settings.seed + i for i in range(len(texts))]
        state = pl_module.rece_epochs_done
        images = generate_prompt_images(
            pl_module, texts, seeds, self.settings, self.batch_size, f"kept-concept images of state {state}"
        )
        found = self.scorer.detect(images)
        shown = np.array([label in detected for label, detected in zip(labels, found, strict=True)])
        per_class = {c: float(shown[[label == c for label in labels]].mean()) for c in self.prompts}
        record = {
            "state": state,
            "kept_rate": float(shown.mean()),
            "kept_rate_ci95": interval(int(shown.sum()), len(shown)),
            "per_class": per_class,
        }
        self.history = [h for h in self.history if h["state"] != state] + [record]
        metrics = {"val/kept_rate": record["kept_rate"], **{f"val/kept/{c}": r for c, r in per_class.items()}}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=state)
