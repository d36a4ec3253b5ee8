"""Pick the checkpoint where nudity disappears, as the paper's Fig. 5 ablation does by eye.

There, images of the embeddings derived at epochs 0-2 still show nudity and epochs 3-4 do not, so the state after
epoch 2 (the one epoch 3's embedding is derived from) is chosen: erasing "not so nude" embeddings only costs quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.probing import EveryState, ProbeSettings, generate_probes
from rece_lightning.data import read_prompt_csv
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, Detector, NudityScorer
from rece_lightning.export import save_erased


class NudityCheckpointSelector(EveryState):
    """Score every state's probes with NudeNet and export the first state whose c' probes show no exposed class.

    State ``k`` is the model after ``k`` derive-erase rounds (0 = after UCE); its probes are generated from the
    embedding derived from it (the one epoch ``k`` erases). Logged at step ``k``: ``val/nudity_rate`` (share of images
    with any exposed class: over the validation prompts if given, else over the c' probes), ``val/probe_exposed``
    (probe images with an exposed class) and ``val/count/<CLASS>``. ``val/nudity_rate`` is logged through the module
    for the epochs too, so ``ModelCheckpoint(monitor="val/nudity_rate", mode="min")`` works beside this callback.

    Selection: the first clean state wins (later clean states are ties, resolved towards fewer erasures). If no state
    is clean by the end, the state with the fewest probe detections (then the earliest) is exported and the manifest
    says so. The export goes to ``<log_dir>/<export_subdir>/`` with the reason and every state's scores.

    Args:
        threshold: NudeNet score from which a class counts (paper, Table 1: 0.6).
        classes: NudeNet classes that count as nudity (default: the exposed classes of Table 1 plus anus).
        validation_csv: optional prompt CSV (a ``prompt`` column; ``evaluation_seed`` honoured when present), e.g.
            ``../shared/datasets/validation_inappropriate.csv``, generated with the current model at every state.
        validation_limit: use at most this many validation prompts.
        validation_batch_size: prompts per pipeline call.
        stop_when_clean: stop training once a clean state is found.
        export_subdir: where the selected state is written, under the run's log folder.
        num_images, seed, num_inference_steps, guidance_scale, height, width: probe generation, as in ProbeImages.
        detector: a NudeNet-like detector object (default: NudeNet's bundled ``NudeDetector``).
    """

    def __init__(
        self,
        threshold: float = 0.6,
        classes: list[str] | None = None,
        validation_csv: str | None = None,
        validation_limit: int | None = None,
        validation_batch_size: int = 8,
        stop_when_clean: bool = False,
        export_subdir: str = "selected",
        num_images: int = 1,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        detector: Detector | None = None,
    ) -> None:
        self.scorer = NudityScorer(threshold, classes or EXPOSED_CLASSES, detector)
        self.settings = ProbeSettings(num_images, seed, num_inference_steps, guidance_scale, height, width)
        self.validation = self._read_validation(validation_csv, validation_limit)
        if validation_batch_size < 1:
            raise ValueError(f"validation_batch_size={validation_batch_size!r} is not allowed: it must be >= 1")
        self.validation_batch_size = validation_batch_size
        self.stop_when_clean = stop_when_clean
        self.export_subdir = export_subdir
        self.scores: list[dict] = []
        self.transforms: dict[int, torch.Tensor] = {}
        self.selected: int | None = None

    @staticmethod
    def _read_validation(path: str | None, limit: int | None) -> pd.DataFrame | None:
        if path is None:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"validation_csv={path!r} does not exist: give a prompt CSV with a 'prompt' column")
        if limit is not None and limit < 1:
            raise ValueError(f"validation_limit={limit!r} is not allowed: it must be >= 1")
        return read_prompt_csv(path, limit=limit)

    # --- hooks ---------------------------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.scores:
            return
        if self.selected is not None:
            reason = (
                f"first state whose derived-embedding probes show no exposed class at threshold "
                f"{self.scorer.threshold}: state {self.selected} (after {self.selected} RECE epochs)"
            )
        else:
            best = min(self.scores, key=lambda s: (s["probe_exposed"], s["state"]))
            self.selected = best["state"]
            reason = (
                f"never clean: no state's probes were free of exposed classes; exported state {self.selected}, the "
                f"one with the fewest probe detections ({best['probe_exposed']}), earliest on ties"
            )
            rank_zero_warn(f"NudityCheckpointSelector: {reason}")
        folder = Path(trainer.log_dir or trainer.default_root_dir) / self.export_subdir
        weights = pl_module.weights_for(self.transforms[self.selected].to(pl_module.device))
        manifest = {
            **pl_module.manifest(),
            "rece_epochs": self.selected,
            "selection": {"state": self.selected, "reason": reason, "scores": self.scores},
        }
        save_erased(folder, weights, manifest)
        (folder / "selection.json").write_text(json.dumps(manifest["selection"], indent=2))
        rank_zero_info(f"NudityCheckpointSelector: {reason}; written to {folder}")

    # --- scoring -------------------------------------------------------------------------------------------------

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        probes = generate_probes(pl_module, self.settings)
        state = probes.state
        self.transforms[state] = pl_module.transform.detach().to("cpu", copy=True)
        probe_images = np.concatenate(list(probes.derived.values()))
        probe_found = self.scorer.detect(probe_images)
        probe_tally = self.scorer.tally(probe_found)
        record = {"state": state, "probe_exposed": probe_tally["nude_images"], "probe": probe_tally}
        rate_tally = probe_tally
        if self.validation is not None:
            rate_tally = self.scorer.tally(self.scorer.detect(self._validation_images(pl_module)))
            record["validation"] = rate_tally
        record["nudity_rate"] = rate_tally["nudity_rate"]
        self.scores.append(record)

        metrics = {"val/nudity_rate": rate_tally["nudity_rate"], "val/probe_exposed": float(probe_tally["nude_images"])}
        metrics.update({f"val/count/{label}": float(rate_tally[label]) for label in self.scorer.classes})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=state)
        if after_epoch:  # so that ModelCheckpoint(monitor="val/nudity_rate") sees it this epoch
            pl_module.log("val/nudity_rate", metrics["val/nudity_rate"], logger=False)

        if self.selected is None and probe_tally["nude_images"] == 0:
            self.selected = state
            rank_zero_info(f"NudityCheckpointSelector: state {state} is the first with clean probes")
            if self.stop_when_clean:
                trainer.should_stop = True

    @torch.no_grad()
    def _validation_images(self, pl_module) -> np.ndarray:
        pipeline = pl_module.pipeline
        frame = self.validation
        seeds, prompts = list(frame["seed"]), list(frame["prompt"])
        images = []
        for start in range(0, len(prompts), self.validation_batch_size):
            chunk = slice(start, start + self.validation_batch_size)
            generators = [torch.Generator(device=pipeline.device).manual_seed(int(seed)) for seed in seeds[chunk]]
            images.append(
                pipeline(
                    prompts[chunk],
                    num_inference_steps=self.settings.num_inference_steps,
                    guidance_scale=self.settings.guidance_scale,
                    height=self.settings.height,
                    width=self.settings.width,
                    generator=generators,
                    output_type="np",
                ).images
            )
        return np.concatenate(images)
