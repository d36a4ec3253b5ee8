"""Pick the checkpoint where the concept disappears, as the paper's Fig. 5 ablation does by eye for nudity.

There, images of the embeddings derived at epochs 0-2 still show nudity and epochs 3-4 do not, so the state after
epoch 2 (the one epoch 3's embedding is derived from) is chosen: erasing "not so nude" embeddings only costs quality.
Here a detector decides: NudeNet for nudity (:class:`NudityCheckpointSelector`), or any
:class:`~rece_lightning.evaluation.scoring.ImageScorer` (the toy world's colour detector, say) with
:class:`ConceptCheckpointSelector`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.probing import (
    EveryState,
    ProbeSettings,
    check_probe_settings,
    generate_probes,
    generate_prompt_images,
)
from rece_lightning.data import read_prompt_csv
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, Detector, NudityScorer
from rece_lightning.evaluation.scoring import ImageScorer, check_concept_classes, check_scorer
from rece_lightning.evaluation.statistics import interval, wilson_interval
from rece_lightning.validation import check_number

SELECT_ON = ("probes", "validation", "both")


class ConceptCheckpointSelector(EveryState):
    """Score every state's probes with a detector and export the first state whose c' probes no longer show the concept.

    State ``k`` is the model after ``k`` derive-erase rounds (0 = after UCE); its probes are generated from the
    embedding derived from it (the one epoch ``k`` erases). Logged at step ``k``: ``<rate_metric>``, the rate the
    selection decides on (``select_on``: the probes' rate, the validation images' rate, or for ``both`` the share of
    all checked images that show the concept: 0 exactly when both are clean); ``val/probe_rate`` and, with validation
    prompts, ``val/validation_rate`` beside it; ``val/probe_<flagged_name>`` (probe images showing it) and
    ``val/count/<CLASS>`` (over the images selection checks). ``<rate_metric>`` is logged through the module for the
    epochs too, so ``ModelCheckpoint(monitor=<rate_metric>, mode="min")`` sees the rate this callback selects on.

    Selection: the first clean state wins (later clean states are ties, resolved towards fewer erasures). If no state
    is clean by the end, the state with the fewest detections (then the earliest) is chosen and the manifest says so.
    The choice goes to ``<log_dir>/<export_subdir>/`` (in the module's ``export_format``) with the reason and every
    state's scores, and the module exports it to its ``export_dir`` too, so the run's main export is the state it
    recommends (the last state, where it differs, beside it as ``<export_dir>_last``).

    The scorer must look for what is erased: where it can tell (``ImageScorer.classes_for``), a scorer whose classes
    do not include an erased concept's is refused before the model loads (``--model.erase_concepts=[blue]`` with a
    ``red`` detector would report "clean" at once); set its classes with ``--selector.scorer.init_args.classes``.

    Args:
        scorer: the detector, e.g. ``rece_lightning.toyworld.ToyWorldScorer`` with ``classes: [red]``; an image shows
            the concept when the scorer finds any of its classes.
        rate_metric: name of the logged selection rate (what ``ModelCheckpoint`` monitors); default
            ``val/concept_rate`` (``val/nudity_rate`` for the NudeNet selector).
        validation_csv: optional prompt CSV (a ``prompt`` column; ``evaluation_seed`` honoured when present),
            generated with the current model at every state.
        validation_prompts: validation prompts given directly instead of a CSV (image ``i`` uses seed ``seed + i``).
        select_on: what must be clean for a state to be selected: the c' ``probes`` (the paper's Fig. 5), the
            ``validation`` prompts, or ``both``.
        validation_limit: use at most this many validation prompts.
        validation_batch_size: prompts per pipeline call.
        stop_when_clean: stop training once a clean state is found.
        max_rate_upper: with it, a state counts as clean when the 95 % Wilson upper bound of its rate (over the
            images selection checks) is below this share, e.g. 0.1: "the true rate is under 10 % at 95 %" (0 of 24
            images bounds it by 13.8 %, so 0.1 needs at least 35 clean images); without it, clean means none flagged.
        export_subdir: where the selected state is written, under the run's log folder.
        probe: probe sampling (:class:`~callbacks.probing.ProbeSettings`), as in ProbeImages; validation prompt ``i``
            uses seed ``probe.seed + i`` and the same sampler.
    """

    flagged_name = "flagged"
    default_rate_metric = "val/concept_rate"

    def __init__(
        self,
        scorer: ImageScorer,
        rate_metric: str | None = None,
        validation_csv: str | None = None,
        validation_prompts: list[str] | None = None,
        validation_limit: int | None = None,
        validation_batch_size: int = 8,
        select_on: str = "probes",
        stop_when_clean: bool = False,
        export_subdir: str = "selected",
        probe: ProbeSettings | None = None,
        max_rate_upper: float | None = None,
    ) -> None:
        self.scorer = check_scorer(scorer, type(self).__name__)
        self.rate_metric = rate_metric or self.default_rate_metric
        self.settings = check_probe_settings(probe)
        if validation_csv is not None and validation_prompts is not None:
            raise ValueError("validation_csv and validation_prompts are both given: choose one source of prompts")
        if validation_prompts is not None:
            if not validation_prompts or not all(isinstance(p, str) and p.strip() for p in validation_prompts):
                raise ValueError(f"validation_prompts={validation_prompts!r} is not allowed: give non-empty prompts")
            seeds = [self.settings.seed + i for i in range(len(validation_prompts))]
            self.validation = pd.DataFrame({"prompt": validation_prompts, "seed": seeds})[:validation_limit]
        else:
            self.validation = None  # read from validation_csv in setup(), when the run needs it
        if validation_limit is not None and validation_limit < 1:
            raise ValueError(f"validation_limit={validation_limit!r} is not allowed: it must be >= 1")
        self.validation_csv, self.validation_limit = validation_csv, validation_limit
        if select_on not in SELECT_ON:
            raise ValueError(f"select_on={select_on!r} is not allowed: choose one of {list(SELECT_ON)}")
        if select_on != "probes" and validation_csv is None and validation_prompts is None:
            raise ValueError(f"select_on={select_on!r} needs validation_csv or validation_prompts")
        self.select_on = select_on
        if validation_batch_size < 1:
            raise ValueError(f"validation_batch_size={validation_batch_size!r} is not allowed: it must be >= 1")
        self.validation_batch_size = validation_batch_size
        self.stop_when_clean = stop_when_clean
        if max_rate_upper is not None:
            check_number("max_rate_upper", max_rate_upper, strictly_above=0, maximum=1)
        self.max_rate_upper = max_rate_upper
        self.export_subdir = export_subdir
        self.scores: list[dict] = []
        self.transforms: dict[int, torch.Tensor] = {}
        self.selected: int | None = None

    # --- state: a resumed run selects exactly what an uninterrupted run would -------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rate_metric=self.rate_metric, export_subdir=self.export_subdir)

    def state_dict(self) -> dict:
        return {
            "scores": self.scores,
            "transforms": {state: t.clone() for state, t in self.transforms.items()},
            "selected": self.selected,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.scores = list(state_dict["scores"])
        self.transforms = {int(state): t.clone() for state, t in state_dict["transforms"].items()}
        self.selected = state_dict["selected"]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the model loads: a wrong detector or a missing prompt set stops the run before any work
        concepts = getattr(pl_module, "concepts", None)
        if concepts is not None:
            check_concept_classes(self.scorer, concepts.erase, type(self).__name__)
        if self.validation is None and self.validation_csv is not None:
            self.validation = read_prompt_csv(self.validation_csv, option="validation_csv", limit=self.validation_limit)

    # --- hooks ---------------------------------------------------------------------------------------------------

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # on every process: it is a collective under DDP
        if not self.scores:
            return
        if self.selected is not None:
            chosen = next(s for s in self.scores if s["state"] == self.selected)
            rule = (
                f"whose 95 % upper bound is below max_rate_upper={self.max_rate_upper}"
                if self.max_rate_upper is not None
                else f"whose {self._what_is_checked()} show none of {list(self.scorer.classes)}"
            )
            reason = (
                f"first state {rule} at threshold {self.scorer.threshold}: state {self.selected} (after "
                f"{self.selected} RECE epochs); {self._bound(chosen)}"
            )
        else:
            best = min(self.scores, key=lambda s: (self._flagged(s), s["state"]))
            self.selected = best["state"]
            never = (
                f"no state's 95 % upper bound fell below max_rate_upper={self.max_rate_upper}"
                if self.max_rate_upper is not None
                else f"no state's {self.select_on} were free of {list(self.scorer.classes)}"
            )
            reason = (
                f"never clean: {never}; chose state {self.selected}, the one with the fewest detections "
                f"({self._flagged(best)}), earliest on ties; {self._bound(best)}"
            )
            rank_zero_warn(f"{type(self).__name__}: {reason}")
        pl_module.recommend(self.selected, self.transforms[self.selected], reason, type(self).__name__)
        if not trainer.is_global_zero:
            return
        folder = Path(log_dir or trainer.default_root_dir) / self.export_subdir
        selection = {"state": self.selected, "reason": reason, "scores": self.scores}
        pl_module.export(
            folder, transform=self.transforms[self.selected], rece_epochs=self.selected, selection=selection
        )
        (folder / "selection.json").write_text(json.dumps(selection, indent=2))
        rank_zero_info(f"{type(self).__name__}: {reason}; written to {folder}")

    # --- scoring -------------------------------------------------------------------------------------------------

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        probes = generate_probes(pl_module, self.settings)  # shared out across processes, gathered on each
        state = probes.state
        self.transforms[state] = pl_module.transform.detach().to("cpu", copy=True)
        validation_images = self._validation_images(pl_module) if self.validation is not None else None
        record = None
        if trainer.is_global_zero:  # one detector pass; every process then takes rank 0's record
            probe_tally = self.scorer.tally(self.scorer.detect(np.concatenate(list(probes.derived.values()))))
            record = {"state": state, "probe_flagged": probe_tally["flagged_images"], "probe": probe_tally}
            if validation_images is not None:
                validation_tally = self.scorer.tally(self.scorer.detect(validation_images))
                record["validation"] = validation_tally
                record["validation_flagged"] = validation_tally["flagged_images"]
            record["rate"] = self._selection_rate(record)
            flagged, images = self._checked(record)
            record["rate_ci95"] = interval(flagged, images)
        record = trainer.strategy.broadcast(record, src=0)
        # a resumed run observes its starting state again: the record replaces the one restored from the checkpoint
        self.scores = [s for s in self.scores if s["state"] != state] + [record]

        counted = record["probe"] if self.select_on == "probes" else record["validation"]
        metrics = {
            self.rate_metric: record["rate"],
            "val/probe_rate": record["probe"]["rate"],
            f"val/probe_{self.flagged_name}": float(record["probe_flagged"]),
        }
        if "validation" in record:
            metrics["val/validation_rate"] = record["validation"]["rate"]
        metrics.update({f"val/count/{label}": float(counted[label]) for label in self.scorer.classes})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=state)
        if after_epoch:  # so that ModelCheckpoint(monitor=rate_metric) sees it this epoch
            pl_module.log(self.rate_metric, metrics[self.rate_metric], logger=False)

        if self.selected is None and self._clean(record):
            self.selected = state
            rank_zero_info(f"{type(self).__name__}: state {state} is the first clean state ({self.select_on})")
            if self.stop_when_clean:
                trainer.should_stop = True

    def _what_is_checked(self) -> str:
        return {
            "probes": "derived-embedding probes",
            "validation": "validation images",
            "both": "derived-embedding probes and validation images",
        }[self.select_on]

    def _clean(self, record: dict) -> bool:
        if self.max_rate_upper is not None:
            return record.get("rate_ci95") is not None and record["rate_ci95"][1] < self.max_rate_upper
        probes_clean = record["probe_flagged"] == 0
        validation_clean = record.get("validation_flagged", 0) == 0
        return {"probes": probes_clean, "validation": validation_clean, "both": probes_clean and validation_clean}[
            self.select_on
        ]

    def _checked(self, record: dict) -> tuple[int, int]:
        """(flagged, images) over the images that selection checks."""
        checked = {"probes": ["probe"], "validation": ["validation"], "both": ["probe", "validation"]}[self.select_on]
        images = sum(record[key]["images"] for key in checked)
        return sum(record[key]["flagged_images"] for key in checked), images

    def _selection_rate(self, record: dict) -> float:
        """The share of the images that selection checks which show the concept (0 exactly for a clean state)."""
        flagged, images = self._checked(record)
        return flagged / images if images else 0.0

    def _bound(self, record: dict) -> str:
        """What a state's count says about its true rate: "0 of 24 ... show ['red']: the true rate is <= 13.8 %"."""
        flagged, images = self._checked(record)
        if not images:
            return "no images were checked"
        low, high = wilson_interval(flagged, images)
        what = {"probes": "probe images", "validation": "validation images", "both": "checked images"}[self.select_on]
        return (
            f"{flagged} of {images} {what} show {list(self.scorer.classes)}: the true rate is "
            + (f"<= {100 * high:.1f} %" if flagged == 0 else f"in [{100 * low:.1f}, {100 * high:.1f}] %")
            + " at 95 % (Wilson)"
        )

    def _flagged(self, record: dict) -> int:
        return {
            "probes": record["probe_flagged"],
            "validation": record.get("validation_flagged", 0),
            "both": record["probe_flagged"] + record.get("validation_flagged", 0),
        }[self.select_on]

    def _validation_images(self, pl_module) -> np.ndarray:
        """Every validation prompt's image at this state; on several processes each makes its share."""
        frame = self.validation
        return generate_prompt_images(
            pl_module,
            list(frame["prompt"]),
            list(frame["seed"]),
            self.settings,
            self.validation_batch_size,
            f"validation images of state {pl_module.rece_epochs_done}",
        )


class NudityCheckpointSelector(ConceptCheckpointSelector):
    """:class:`ConceptCheckpointSelector` with NudeNet built in: the nudity recipe's selector (paper, Fig. 5).

    Logs ``val/nudity_rate`` (share of images with any exposed class), ``val/probe_exposed`` and ``val/count/<CLASS>``.
    Every option of :class:`ConceptCheckpointSelector` but ``scorer`` applies (``select_on``, ``validation_csv``,
    ``validation_prompts``, ``stop_when_clean``, ``probe``, ...).

    Args:
        threshold: NudeNet score from which a class counts (paper, Table 1: 0.6).
        classes: NudeNet classes that count as nudity (default: the exposed classes of Table 1 plus anus).
        detector: a NudeNet-like detector object (default: NudeNet's bundled ``NudeDetector``).
        **kwargs: the options of :class:`ConceptCheckpointSelector`, e.g. ``validation_csv:
            ../shared/datasets/validation_inappropriate.csv`` (the authors' set).
    """

    flagged_name = "exposed"
    default_rate_metric = "val/nudity_rate"

    def __init__(
        self,
        threshold: float = 0.6,
        classes: list[str] | None = None,
        detector: Detector | None = None,
        **kwargs,
    ) -> None:
        super().__init__(NudityScorer(threshold, classes or EXPOSED_CLASSES, detector), **kwargs)
