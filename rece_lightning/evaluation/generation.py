"""The generation stage of an evaluation: prompt items in, images on disk out, keyed by what made them.

An *image set* is the images of one model under one sampler. Its folder is named by a fingerprint of what made it —
a sha256 of the K/V weights, the base model, the U-Net's config, the scheduler and its config, the step count and
the dtype — and holds a manifest (``image_set.json``) of those settings; each PNG records its own prompt, seed,
guidance and size. A rerun with another export, base model or sampler therefore lands in another folder and reuses
nothing; a rerun of the same run reads back what exists (where the PNG's record matches its item) and generates only
the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from rece_lightning.data import PromptItem
from rece_lightning.evaluation.nudity import to_uint8
from rece_lightning.families import family_of
from rece_lightning.files import atomic_write

# The reference protocol: the authors' generation script (from ESD / UCE) samples with LMS, 50 steps, 512 px.
REFERENCE_SCHEDULER = "lms"
REFERENCE_STEPS = 50
REFERENCE_SIZE = 512
MODEL_SCHEDULER = "model"  # keep the scheduler the pipeline folder ships with (the toy model's DDIM)
SCHEDULERS: dict[str, str] = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
MANIFEST_NAME = "image_set.json"
RECORD_KEY = "rece_lightning"


def check_scheduler(name: str) -> str:
    """Refuse a scheduler name the evaluation does not know, naming the allowed ones."""
    if name != MODEL_SCHEDULER and name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not allowed: choose one of {[MODEL_SCHEDULER, *SCHEDULERS]}")
    return name


def use_scheduler(pipeline, name: str) -> None:
    """Replace the pipeline's scheduler by ``name``'s class built from the same config (betas, timestep spacing)."""
    if check_scheduler(name) == MODEL_SCHEDULER:
        return
    import diffusers

    pipeline.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipeline.scheduler.config)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def sampler_settings(pipeline, base_model: str, num_inference_steps: int, dtype: str) -> dict[str, Any]:
    """What, besides the K/V weights, decides the images of a pipeline (part of every image set's fingerprint)."""
    denoiser = family_of(pipeline).denoiser(pipeline)
    scheduler_config = {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")}
    return _jsonable(
        {
            "base_model": base_model,
            "unet_config": {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")},
            "scheduler": type(pipeline.scheduler).__name__,
            "scheduler_config": scheduler_config,
            "num_inference_steps": num_inference_steps,
            "dtype": dtype,
        }
    )


def image_set_settings(
    pipeline,
    base_model: str,
    num_inference_steps: int,
    dtype: str,
    size_override: Sequence[int | None],
    attack: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything but the K/V weights that an evaluation's image set is keyed by: the sampler
    (:func:`sampler_settings`), the ``height`` / ``width`` override, and the attack and its settings, if any."""
    settings = sampler_settings(pipeline, base_model, num_inference_steps, dtype)
    settings["size_override"] = list(size_override)
    if attack is not None:
        settings["attack"] = _jsonable(dict(attack))
    return settings


def image_record(item: PromptItem, height: int, width: int) -> dict[str, Any]:
    """What a PNG of the set records about its own image."""
    return {"prompt": item.prompt, "seed": item.seed, "guidance": item.guidance, "height": height, "width": width}


@dataclass(frozen=True)
class ImageSet:
    """The images of one model and sampler, in ``<root>/<variant>/<fingerprint[:16]>/<case>_<k>.png``."""

    folder: Path
    fingerprint: str
    settings: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, variant: str, settings: Mapping[str, Any]) -> ImageSet:
        """The set for ``settings`` under ``root`` (created with its manifest if new)."""
        settings = _jsonable(dict(settings))
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        folder = Path(root) / variant / fingerprint[:16]
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST_NAME
        if manifest.is_file():
            recorded = json.loads(manifest.read_text())
            if recorded.get("fingerprint") != fingerprint:  # a 64-bit prefix collision, or a hand-edited folder
                raise RuntimeError(
                    f"{folder} holds the images of another model or sampler (fingerprint "
                    f"{recorded.get('fingerprint')!r}, expected {fingerprint!r}): move it away and rerun"
                )
        else:
            text = json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2, sort_keys=True)
            atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))
        return cls(folder, fingerprint, settings)

    def read(self, item: PromptItem, record: Mapping[str, Any]) -> np.ndarray | None:
        """The saved image of ``item``, or None if there is none or it was made for another prompt, seed or size."""
        path = self.folder / item.image_name
        if not path.is_file():
            return None
        with Image.open(path) as image:
            saved = image.text.get(RECORD_KEY) if hasattr(image, "text") else None
            if saved is None or json.loads(saved) != _jsonable(dict(record)):
                return None
            return np.asarray(image.convert("RGB"))

    def write(self, item: PromptItem, record: Mapping[str, Any], image: np.ndarray) -> None:
        """Save ``image`` atomically (an interrupted run never leaves a truncated PNG that a rerun would trust)."""
        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, json.dumps(_jsonable(dict(record)), sort_keys=True))
        atomic_write(
            self.folder / item.image_name,
            lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info),
        )


def generate_images(
    pipeline,
    items: Sequence[PromptItem],
    sizes: Sequence[tuple[int, int]],
    num_inference_steps: int,
    prompt_embeds: Sequence[Tensor] | None = None,
) -> list[np.ndarray]:
    """uint8 (H, W, 3) images of ``items`` at ``sizes`` ((height, width) each), one pipeline call per guidance and
    size; CPU generators, so the same seed gives the same starting noise on any device. ``prompt_embeds`` (one
    (T, d) embedding per item, e.g. a red-team attack's) replaces the items' prompts."""
    family = family_of(pipeline)
    images: list[np.ndarray | None] = [None] * len(items)
    key = lambda i: (items[i].guidance, sizes[i])  # noqa: E731
    for (guidance, (height, width)), group in groupby(sorted(range(len(items)), key=key), key=key):
        group = list(group)
        if prompt_embeds is None:
            inputs = {"prompts": [items[i].prompt for i in group]}
        else:
            inputs = {"embeds": torch.stack([prompt_embeds[i] for i in group])}
        output = family.generate(
            pipeline,
            **inputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(items[i].seed) for i in group],
            output_type="np",
        ).images
        for i, image in zip(group, to_uint8(output), strict=True):
            images[i] = image
    return images
