"""What every red-team attack offers the evaluator: for one prompt, the embedding that attacks a model.

An attack is a *prompt source* of the evaluation (:class:`~rece_lightning.evaluation.ErasureEvaluator`, option
``attack``): for each prompt of the CSV and each model (original, erased) it returns an :class:`AttackOutcome` — the
text embedding to generate from, the adversarial prompt where the attack yields a discrete one, the steps it spent
and its loss curve — and the evaluator generates that prompt's images from it and scores them (ASR per prompt).
Outcomes are saved per prompt beside the images, so a rerun skips the prompts already attacked.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rece_lightning.data import PromptItem
from rece_lightning.families import family_of
from rece_lightning.files import atomic_write

if TYPE_CHECKING:  # the evaluation package imports this module
    from rece_lightning.evaluation.scoring import ImageScorer


@dataclass
class AttackContext:
    """What an attack may use: the pipeline (its U-Net holds the attacked model's K/V), both weight sets, a detector.

    Attributes:
        pipeline: the diffusers pipeline, K/V of the attacked model written in.
        variant: ``original`` or ``erased``.
        original_kv / attacked_kv: K/V matrices by name (the base model's; the attacked model's).
        scorer: finds the concept in images (NudeNet for nudity, a toy-world detector): an attack's own success check.
        num_inference_steps: the evaluation's sampler steps (an attack's trajectories use the same).
    """

    pipeline: Any
    variant: str
    original_kv: Mapping[str, Tensor]
    attacked_kv: Mapping[str, Tensor]
    scorer: ImageScorer
    num_inference_steps: int

    @property
    def device(self) -> torch.device:
        return self.family.denoiser(self.pipeline).device

    @property
    def family(self):
        """The pipeline's model family (:mod:`rece_lightning.families`): its encoder, denoiser and generation."""
        return family_of(self.pipeline)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """(N, T, d) text embeddings, as the pipeline computes them (padded to the tokenizer's length)."""
        return torch.stack([encoded.embedding for encoded in self.family.encode(self.pipeline, prompts)])

    def generate(self, prompt_embeds: Tensor, items: Sequence[PromptItem], height: int, width: int) -> list[np.ndarray]:
        """uint8 images of ``items`` (their seeds and guidance) from one (T, d) embedding; CPU generators."""
        from rece_lightning.evaluation import generation  # here: the evaluation package imports this module

        sizes = [(height, width)] * len(items)
        return generation.generate_images(
            self.pipeline, items, sizes, self.num_inference_steps, prompt_embeds=[prompt_embeds] * len(items)
        )

    def shows_concept(self, images: Sequence[np.ndarray]) -> bool:
        return any(bool(found) for found in self.scorer.detect(images))


@dataclass
class AttackOutcome:
    """One prompt attacked on one model.

    Attributes:
        prompt_embeds: (T, d) embedding the images are generated from.
        adversarial_prompt: the discrete prompt, where the attack produces one (UnlearnDiff, Ring-A-Bell).
        steps: optimisation steps / generations spent (0 for a closed form).
        found: the attack's own success check, where it has one (None: it has none; the evaluator's ASR decides).
        losses: the objective after each step, for the record (an optimiser's loss goes down).
    """

    prompt_embeds: Tensor
    adversarial_prompt: str | None = None
    steps: int = 0
    found: bool | None = None
    losses: list[float] = field(default_factory=list)

    def save(self, folder: Path, case_number: int, name: str | None = None) -> None:
        """``<name>.json`` and ``<name>.safetensors`` (``name``: the prompt's key, by default its case number), each
        written atomically (embedding first, json last)."""
        name = str(case_number) if name is None else name
        folder.mkdir(parents=True, exist_ok=True)
        embeds = self.prompt_embeds.detach().to("cpu", torch.float32).contiguous()
        atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file({"prompt_embeds": embeds}, tmp))
        record = {k: v for k, v in asdict(self).items() if k != "prompt_embeds"}
        text = json.dumps({"case_number": case_number, **record}, indent=1)
        atomic_write(folder / f"{name}.json", lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, folder: Path, name: int | str) -> AttackOutcome | None:
        """The saved outcome of the prompt saved as ``name``, or None (not attacked yet, or an interrupted write)."""
        record_path, embeds_path = folder / f"{name}.json", folder / f"{name}.safetensors"
        if not (record_path.is_file() and embeds_path.is_file()):
            return None
        record = json.loads(record_path.read_text())
        record.pop("case_number", None)
        return cls(prompt_embeds=load_file(str(embeds_path))["prompt_embeds"], **record)


class PromptAttack(ABC):
    """A red-team attack: per prompt and model, the embedding that best brings ``concept`` back.

    Whether it succeeded is decided by the evaluator's detector (``asr`` for NudeNet, ``concept_asr`` for any
    ``scorer``) on the images generated from the outcome, per prompt.

    ``model_agnostic`` attacks (Ring-A-Bell) never look at the U-Net: one outcome per prompt serves every model.
    """

    name: ClassVar[str]
    model_agnostic: ClassVar[bool] = False
    drives_text_encoder: ClassVar[bool] = True  # token-level: needs a family with ``token_attacks``

    def __init__(self, concept: str) -> None:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(
                f"concept={concept!r} is not allowed: name the concept the attack brings back (e.g. 'nudity', 'red')"
            )
        self.concept = concept

    def settings(self) -> dict[str, Any]:
        """Everything that changes the outcome; part of the image sets' fingerprint (another setting, another set)."""
        return {"attack": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def check_prompt(self, tokenizer, prompt: str) -> None:
        """Refuse a prompt the attack cannot handle (e.g. too long for its extra tokens), before any model runs."""

    @abstractmethod
    def attack(self, context: AttackContext, items: Sequence[PromptItem], height: int, width: int) -> AttackOutcome:
        """Attack one prompt (``items``: its images, all with the same prompt) on ``context``'s model."""
