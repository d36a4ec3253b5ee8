"""How well a toy-world pipeline follows its prompts, and how often it shows a concept, by the world's detectors."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np
import torch

from rece_lightning.evaluation.nudity import to_uint8
from rece_lightning.toyworld import model as toy_model
from rece_lightning.toyworld.detectors import predict
from rece_lightning.toyworld.world import (
    COLOUR_THINGS,
    COLOUR_WORDS,
    COLOURS,
    OBJECT_COLOURS,
    SHAPE_WORDS,
    SHAPES,
    TEXTURES,
    object_phrase,
    templated,
)


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
    """(prompt, labels) for every colour x shape x texture, by their names, templates taken in turn."""
    rows = []
    for colour, shape, texture in product(colours, shapes, textures):
        for k in range(images_per_combination):
            prompt = templated(k, object_phrase(colour, shape, texture))
            rows.append((prompt, {"colour": colour, "shape": shape, "texture": texture}))
    return rows


IMPLICIT_KINDS = ("synonym", "indirect")


def implicit_prompts(
    colours: Sequence[str] = tuple(COLOURS), images_per_phrase: int = 5
) -> list[tuple[str, dict[str, str]]]:
    """(prompt, labels) that bring each colour without naming it: its synonyms ("a crimson disc") and its indirect
    descriptions ("a square the colour of blood"), shapes, textures and templates taken in turn. ``labels["kind"]`` is
    "synonym" or "indirect": the I2P analog of the toy world (configs/prompts/toyworld_implicit.csv)."""
    rows = []
    for colour in colours:
        phrases = [(w, "synonym") for w, _ in COLOUR_WORDS[colour][1:]]
        phrases += [(t, "indirect") for t, _ in COLOUR_THINGS[colour]]
        for p, (word, kind) in enumerate(phrases):
            for k in range(images_per_phrase):
                shape, texture = SHAPES[(k + p) % len(SHAPES)], TEXTURES[(k + 2 * p) % len(TEXTURES)]
                phrase = object_phrase(colour, shape, texture, colour_word=word)
                prompt = templated(k + p, phrase)
                rows.append((prompt, {"colour": colour, "shape": shape, "texture": texture, "kind": kind}))
    return rows


def shape_synonym_prompts(images_per_word: int = 3) -> list[tuple[str, dict[str, str]]]:
    """(prompt, labels) naming each shape by one of its synonyms ("a red disc", "a photo of a blue rhombus")."""
    rows = []
    colours = list(COLOURS)
    for s, shape in enumerate(SHAPES):
        for w, (word, _) in enumerate(SHAPE_WORDS[shape][1:]):
            for k in range(images_per_word):
                colour, texture = colours[(s + w + k) % len(colours)], TEXTURES[(w + k) % len(TEXTURES)]
                phrase = object_phrase(colour, shape, texture, shape_word=word)
                prompt = templated(k + w, phrase)
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


def prompt_following(pipeline, images_per_combination: int = 2, seed: int = 1000, **sampling) -> dict:
    """How well the model follows its prompts (default sampler), by the world's detectors:

    * ``colour`` / ``shape`` / ``texture``: accuracy over every colour (grey, the prompts that name none, included) x
      shape x texture, said by their names;
    * ``implicit_colour``: colour accuracy on the prompts that bring a colour without naming it, split into
      ``synonym_colour`` ("a crimson disc") and ``indirect_colour`` ("a square the colour of blood");
    * ``synonym_shape``: shape accuracy on prompts that name the shape by a synonym ("a red rhombus").
    """
    rows = combination_prompts(OBJECT_COLOURS, images_per_combination=images_per_combination)
    implicit = implicit_prompts(images_per_phrase=images_per_combination + 1)
    shapes = shape_synonym_prompts(images_per_word=images_per_combination)
    everything = [*rows, *implicit, *shapes]
    images = generate(pipeline, [p for p, _ in everything], [seed + i for i in range(len(everything))], **sampling)
    labels = [labels for _, labels in everything]
    hits = _hits(images, labels)
    named, implicit_part = slice(0, len(rows)), slice(len(rows), len(rows) + len(implicit))
    shape_part = slice(len(rows) + len(implicit), len(everything))
    colours = np.array([label["colour"] for label in labels])
    kinds = np.array([label.get("kind", "") for label in labels])
    per_colour = {colour: _share(hits["colour"][named][colours[named] == colour]) for colour in OBJECT_COLOURS}
    implicit_hits = hits["colour"][implicit_part]
    return {
        "images": len(everything),
        **{a: _share(h[named]) for a, h in hits.items()},
        "colour_by_colour": per_colour,
        "implicit_colour": _share(implicit_hits),
        **{f"{kind}_colour": _share(implicit_hits[kinds[implicit_part] == kind]) for kind in IMPLICIT_KINDS},
        "implicit_colour_by_colour": {
            colour: _share(implicit_hits[colours[implicit_part] == colour]) for colour in COLOURS
        },
        "synonym_shape": _share(hits["shape"][shape_part]),
    }


_CSV_COLUMNS = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "categories"]


def _write_csv(path, rows, seed: int, extra: Sequence[str] = ()) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*_CSV_COLUMNS, *extra])
        for index, (prompt, labels) in enumerate(rows):
            cells = [index, prompt, seed + index, toy_model.GUIDANCE_SCALE, labels["colour"]]
            writer.writerow([*cells, *(labels[column] for column in extra)])


def write_prompt_csv(path, images_per_combination: int = 2, seed: int = 0) -> None:
    """The toy world's named-prompt CSV (the columns of the paper's CSVs; ``categories`` is the colour; ``shape`` and
    ``texture`` the other labels): every colour x shape x texture."""
    _write_csv(path, combination_prompts(images_per_combination=images_per_combination), seed, ("shape", "texture"))


def write_implicit_csv(path, images_per_phrase: int = 5, seed: int = 50_000) -> None:
    """The toy world's I2P analog: prompts that bring a colour without naming it (``categories``: the colour it
    brings; ``kind``: synonym or indirect)."""
    _write_csv(path, implicit_prompts(images_per_phrase=images_per_phrase), seed, ("shape", "texture", "kind"))


def main(argv: Sequence[str] | None = None) -> None:
    """Write the shipped prompt CSVs: ``python -m rece_lightning.toyworld.measure configs/prompts``."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    write_prompt_csv(args.folder / "toyworld.csv")
    write_implicit_csv(args.folder / "toyworld_implicit.csv")


if __name__ == "__main__":
    main()
