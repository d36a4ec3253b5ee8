"""How well a toy-world pipeline follows its prompts, and how often it shows a concept, by the world's detectors."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np
import torch

from rece_lightning.evaluation.nudity import to_uint8
from rece_lightning.toyworld import model as toy_model
from rece_lightning.toyworld.detectors import predict
from rece_lightning.toyworld.world import COLOURS, OBJECT_COLOURS, SHAPES, TEMPLATES, TEXTURES, object_phrase


@torch.no_grad()
def generate(
    pipeline,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (),
    *,
    prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int = toy_model.NUM_INFERENCE_STEPS,
    guidance_scale: float = toy_model.GUIDANCE_SCALE,
    batch_size: int = 128,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images, image i from CPU seed ``seeds[i]`` (from prompts, or from ``prompt_embeds``)."""
    count = len(seeds)
    images = []
    for start in range(0, count, batch_size):
        chunk = slice(start, min(start + batch_size, count))
        inputs = {"prompt": list(prompts[chunk])} if prompt_embeds is None else {"prompt_embeds": prompt_embeds[chunk]}
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        images.append(
            pipeline(
                **inputs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
            ).images
        )
    return to_uint8(np.concatenate(images))


def combination_prompts(
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    textures: Sequence[str] = TEXTURES,
    images_per_combination: int = 4,
) -> list[tuple[str, dict[str, str]]]:
    """(prompt, labels) for every colour x shape x texture, templates taken in turn."""
    rows = []
    for colour, shape, texture in product(colours, shapes, textures):
        for k in range(images_per_combination):
            template = TEMPLATES[k % len(TEMPLATES)]
            prompt = template.format(object=object_phrase(colour, shape, texture))
            rows.append((prompt, {"colour": colour, "shape": shape, "texture": texture}))
    return rows


def _hits(images: np.ndarray, labels: Sequence[dict[str, str]]) -> dict[str, np.ndarray]:
    """Per attribute, whether each image's detected value is the prompted one (each image detected once)."""
    predictions = [predict(image) for image in images]
    return {
        attribute: np.array(
            [getattr(p, attribute) == label[attribute] for p, label in zip(predictions, labels, strict=True)]
        )
        for attribute in ("colour", "shape", "texture")
    }


def _share(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def accuracy(images: np.ndarray, labels: Sequence[dict[str, str]]) -> dict[str, float]:
    """Share of images whose detected colour / shape / texture is the prompted one."""
    return {attribute: _share(hits) for attribute, hits in _hits(images, labels).items()}


def prompt_following(pipeline, images_per_combination: int = 4, seed: int = 1000, **sampling) -> dict:
    """Colour, shape and texture accuracy over every combination of the world's attributes, grey (the prompts that
    name no colour) included (default sampler)."""
    rows = combination_prompts(OBJECT_COLOURS, images_per_combination=images_per_combination)
    images = generate(pipeline, [p for p, _ in rows], [seed + i for i in range(len(rows))], **sampling)
    labels = [labels for _, labels in rows]
    hits = _hits(images, labels)
    colours = np.array([label["colour"] for label in labels])
    per_colour = {colour: _share(hits["colour"][colours == colour]) for colour in OBJECT_COLOURS}
    return {"images": len(rows), **{a: _share(h) for a, h in hits.items()}, "colour_by_colour": per_colour}


def write_prompt_csv(path, images_per_combination: int = 4, seed: int = 0) -> None:
    """An evaluation prompt CSV of the toy world (the columns the paper's CSVs use; ``categories`` is the colour)."""
    import csv

    rows = combination_prompts(images_per_combination=images_per_combination)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "categories"])
        for index, (prompt, labels) in enumerate(rows):
            writer.writerow([index, prompt, seed + index, toy_model.GUIDANCE_SCALE, labels["colour"]])
