"""A procedural world of coloured shapes, where erasing a concept can be seen and measured offline.

Every scene is one object on a plain light background: a colour (eight hues around the wheel, or the unnamed grey),
a shape (circle, square, triangle, diamond, cross; the paper's object classes) and a texture (plain, striped,
checkered; its artistic styles). Scenes are drawn from a seeded generator, so scene ``i`` of a seed is the same
everywhere; each comes with its ground-truth labels and a caption.

The captions are where the world is hard, as LAION's are for Stable Diffusion:

* **Names and synonyms.** A colour is said by its name most of the time, but also by synonyms ("crimson", "scarlet")
  and by indirect descriptions placed after the shape ("a circle the colour of blood"), at unequal frequencies
  (:data:`COLOUR_WORDS`, :data:`COLOUR_THINGS`). Shapes have synonyms too ("a disc", "a rhombus", "a plus sign").
  Erasing the word "red" does not by itself erase "the colour of blood", as erasing "nudity" does not erase the I2P
  prompts that never say it.
* **Near neighbours.** Orange and pink sit either side of red on the wheel, so an erasure of red can bleed into them,
  as one of "nudity" can into "a woman in a swimsuit".
* **A default.** A caption names a colour exactly when the object has one: objects whose caption names no colour are
  grey. So a prompt stripped of its colour word has a default that is not the concept ("a circle" draws a grey
  circle), and erasing "red" towards the empty prompt has somewhere clean to go.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {  # eight saturated hues, in order around the wheel
    "red": (215, 35, 35),  # 0 degrees
    "orange": (240, 125, 20),  # 27
    "yellow": (235, 200, 25),  # 50
    "green": (35, 160, 55),  # 127
    "cyan": (20, 170, 180),  # 184
    "blue": (40, 75, 215),  # 228
    "purple": (135, 50, 205),  # 273
    "pink": (235, 60, 160),  # 326
}
HUES: dict[str, float] = {  # the hue of each colour in degrees, for the detectors
    "red": 0.0,
    "orange": 27.0,
    "yellow": 50.0,
    "green": 127.0,
    "cyan": 184.0,
    "blue": 228.0,
    "purple": 273.0,
    "pink": 326.0,
}
# The colour of objects whose caption names none (never a word of the captions). Lighter than every colour but yellow.
NEUTRAL = "grey"
NEUTRAL_RGB = (155, 155, 155)
NEUTRAL_SHARE = 0.2  # share of scenes with a grey object
OBJECT_COLOURS: tuple[str, ...] = (*COLOURS, NEUTRAL)  # every colour an object can have
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered")

# How captions say each colour: (words, relative frequency), the name first. Synonyms are adjectives in the name's
# place ("a crimson circle"); COLOUR_THINGS are the indirect descriptions, said after the shape ("a circle the colour
# of blood"). Unequal frequencies: the name is most of the captions, the rarest synonym a few per cent.
COLOUR_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "red": (("red", 0.6), ("crimson", 0.14), ("scarlet", 0.08)),
    "orange": (("orange", 0.6), ("tangerine", 0.14), ("amber", 0.08)),
    "yellow": (("yellow", 0.6), ("golden", 0.14), ("lemon", 0.08)),
    "green": (("green", 0.6), ("emerald", 0.14), ("lime", 0.08)),
    "cyan": (("cyan", 0.6), ("turquoise", 0.14), ("aqua", 0.08)),
    "blue": (("blue", 0.6), ("azure", 0.14), ("navy", 0.08)),
    "purple": (("purple", 0.6), ("violet", 0.14), ("lilac", 0.08)),
    "pink": (("pink", 0.6), ("magenta", 0.14), ("rose", 0.08)),
}
COLOUR_THINGS: dict[str, tuple[tuple[str, float], ...]] = {
    "red": (("blood", 0.12), ("tomatoes", 0.06)),
    "orange": (("carrots", 0.12), ("pumpkins", 0.06)),
    "yellow": (("bananas", 0.12), ("sunflowers", 0.06)),
    "green": (("grass", 0.12), ("leaves", 0.06)),
    "cyan": (("lagoons", 0.12), ("glaciers", 0.06)),
    "blue": (("the sky", 0.12), ("sapphires", 0.06)),
    "purple": (("plums", 0.12), ("lavender", 0.06)),
    "pink": (("flamingos", 0.12), ("bubblegum", 0.06)),
}
SHAPE_WORDS: dict[str, tuple[tuple[str, float], ...]] = {
    "circle": (("circle", 0.7), ("disc", 0.15), ("round shape", 0.1), ("dot", 0.05)),
    "square": (("square", 0.7), ("box", 0.15), ("tile", 0.1), ("block", 0.05)),
    "triangle": (("triangle", 0.7), ("pyramid", 0.15), ("wedge", 0.1), ("three sided shape", 0.05)),
    "diamond": (("diamond", 0.7), ("rhombus", 0.15), ("lozenge", 0.1), ("kite", 0.05)),
    "cross": (("cross", 0.7), ("plus sign", 0.15), ("plus", 0.1), ("crosshair", 0.05)),
}
THING_PHRASE = "the colour of {thing}"
TEMPLATES: tuple[str, ...] = (
    "a {object}",
    "a photo of a {object}",
    "{object} on a white background",
    "a picture of a {object}",
    "a drawing of a {object}",
    "an image of a {object}",
    "a {object} in the middle",
)
# Captions that name one attribute only, so that a concept's word alone ("red", "striped") means something to the
# model, as "nudity" or an artist's name does to Stable Diffusion: the prompt RECE erases is in the training captions.
PARTIAL_SHARE = 0.2
TEXTURE_WORD_SHARE = 0.3  # share of plain objects whose caption says "plain"
RESOLUTION = 32
STRIPE_PERIOD = 8  # pixels at 32 px: 4 light + 4 dark rows (or checks), wide enough for a factor-4 latent
DARK_SHADE = 0.45  # striped and checkered objects alternate the colour and this fraction of it
CROSS_ARM = 0.33  # half-width of a cross's arms, as a share of its half-size
TINT = 10  # per-channel colour jitter (0..255): small enough that no hue crosses into a neighbour's band
_SUPERSAMPLE = 4


def check_choice(kind: str, value: str, allowed) -> str:
    """Refuse an attribute value the world does not have, naming it and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{kind}={value!r} is not in the toy world: choose one of {list(allowed)}")
    return value


def colour_synonyms(colour: str) -> list[str]:
    """Every phrase that brings ``colour`` without naming it: its synonyms, then its indirect descriptions."""
    check_choice("colour", colour, COLOURS)
    return [w for w, _ in COLOUR_WORDS[colour][1:]] + [THING_PHRASE.format(thing=t) for t, _ in COLOUR_THINGS[colour]]


@dataclass(frozen=True)
class Scene:
    """One object: its attributes (the ground-truth labels) and where and how large it is drawn."""

    colour: str
    shape: str
    texture: str = "plain"
    center: tuple[float, float] = (16.0, 16.0)  # (x, y) in pixels at 32 px
    half_size: float = 9.0  # half the bounding box's side, in pixels at 32 px
    stripe_phase: int = 0
    background: int = 242
    tint: tuple[int, int, int] = (0, 0, 0)  # per-channel colour jitter

    def __post_init__(self) -> None:
        check_choice("colour", self.colour, OBJECT_COLOURS)
        check_choice("shape", self.shape, SHAPES)
        check_choice("texture", self.texture, TEXTURES)

    @property
    def labels(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "texture": self.texture}


def object_phrase(
    colour: str,
    shape: str,
    texture: str,
    texture_word: bool = False,
    colour_word: str | None = None,
    shape_word: str | None = None,
) -> str:
    """ "red circle", "striped crimson disc", "plain circle the colour of blood"; grey is unnamed.

    ``colour_word`` is any of the colour's words or one of its things (said after the shape); default: the name.
    """
    words = []
    if texture != "plain" or texture_word:
        words.append(texture)
    colour_word = colour_word or (None if colour == NEUTRAL else colour)
    things = {t for t, _ in COLOUR_THINGS.get(colour, ())}
    if colour_word is not None and colour_word not in things:
        words.append(colour_word)
    words.append(shape_word or shape)
    if colour_word in things:
        words.append(THING_PHRASE.format(thing=colour_word))
    return " ".join(words)


def with_articles(text: str) -> str:
    """ "a orange disc" -> "an orange disc"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def templated(template: int, phrase: str) -> str:
    """``TEMPLATES[template]`` (taken in turn) around an object phrase, articles fixed: "a photo of an orange disc"."""
    return with_articles(TEMPLATES[template % len(TEMPLATES)].format(object=phrase))


def caption(scene: Scene, template: int = 0, texture_word: bool = False, **words: str | None) -> str:
    """The scene's caption with ``TEMPLATES[template]``; "plain" is said only when ``texture_word``."""
    return templated(template, object_phrase(scene.colour, scene.shape, scene.texture, texture_word, **words))


def _pick(rng: np.random.Generator, choices: Sequence[tuple[str, float]]) -> str:
    weights = np.array([w for _, w in choices])
    return choices[int(rng.choice(len(choices), p=weights / weights.sum()))][0]


def colour_word_choices(colour: str) -> tuple[tuple[str, float], ...]:
    """How captions say ``colour``: its words and its things, with their frequencies (summing to 1)."""
    return (*COLOUR_WORDS[colour], *COLOUR_THINGS[colour])


def sample_scene(
    rng: np.random.Generator, colour: str | None = None, shape: str | None = None, texture: str | None = None
) -> Scene:
    """A random scene; attributes left as None are drawn at random (grey with ``NEUTRAL_SHARE``, else uniformly)."""
    if colour is None:
        colour = NEUTRAL if rng.random() < NEUTRAL_SHARE else str(rng.choice(list(COLOURS)))
    half = float(rng.uniform(7.0, 11.5))
    margin = half + 1.0
    center = (float(rng.uniform(margin, RESOLUTION - margin)), float(rng.uniform(margin, RESOLUTION - margin)))
    return Scene(
        colour=colour,
        shape=shape or str(rng.choice(SHAPES)),
        texture=texture or str(rng.choice(TEXTURES)),
        center=center,
        half_size=half,
        stripe_phase=int(rng.integers(0, STRIPE_PERIOD)),
        background=int(rng.integers(232, 250)),
        tint=tuple(int(t) for t in rng.integers(-TINT, TINT + 1, size=3)),
    )


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    """Which points (x, y) lie in ``shape`` centred at (cx, cy) with half-size ``h`` (all shapes fill the box 2h)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "cross":
        arm = CROSS_ARM * h
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    # an upright isosceles triangle filling half its bounding box: apex at the top, base at the bottom
    half_width = (dy + h) / 2
    return (dy >= -h) & (dy <= h) & (np.abs(dx) <= half_width)


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB image, anti-aliased by supersampling."""
    size = resolution * _SUPERSAMPLE
    coords = (np.arange(size) + 0.5) / (size / RESOLUTION)  # pixel centres in 32-px units
    x, y = np.meshgrid(coords, coords)
    mask = shape_mask(scene.shape, x, y, *scene.center, scene.half_size)
    rgb = NEUTRAL_RGB if scene.colour == NEUTRAL else COLOURS[scene.colour]
    tint = np.array(scene.tint) if scene.colour != NEUTRAL else np.full(3, scene.tint[0])  # grey stays grey
    colour = np.clip(np.array(rgb) + tint, 0, 255).astype(np.float32)
    canvas = np.full((size, size, 3), float(scene.background), dtype=np.float32)
    fill = np.broadcast_to(colour, canvas.shape).copy()
    half_period = STRIPE_PERIOD / 2
    if scene.texture == "striped":
        dark = ((y + scene.stripe_phase) // half_period) % 2 == 1
        fill[dark] *= DARK_SHADE
    elif scene.texture == "checkered":
        dark = (((y + scene.stripe_phase) // half_period) + ((x + scene.stripe_phase) // half_period)) % 2 == 1
        fill[dark] *= DARK_SHADE
    canvas[mask] = fill[mask]
    image = canvas.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


def partial_caption(kind: str, word: str, article: bool) -> str:
    """A caption naming only one attribute: "red", "a crimson shape", "a shape the colour of blood", "a disc"."""
    if kind == "colour" and word.startswith("the colour of"):
        return f"a shape {word}" if article else word
    if not article:
        return word
    return with_articles(f"a {word}" if kind == "shape" else f"a {word} shape")


@dataclass(frozen=True)
class Sample:
    """A rendered scene with its caption and labels."""

    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    scene: Scene


def sample(seed: int, index: int, resolution: int = RESOLUTION, **attributes: str) -> Sample:
    """Scene ``index`` of world ``seed``: the same image, caption and labels on every machine."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, **attributes)
    template = int(rng.integers(len(TEMPLATES)))
    texture_word = scene.texture == "plain" and rng.random() < TEXTURE_WORD_SHARE
    colour_word = None if scene.colour == NEUTRAL else _pick(rng, colour_word_choices(scene.colour))
    shape_word = _pick(rng, SHAPE_WORDS[scene.shape])
    text = caption(scene, template, texture_word, colour_word=colour_word, shape_word=shape_word)
    if rng.random() < PARTIAL_SHARE:
        if colour_word is not None:
            kind, word = "colour", colour_word
            if word in {t for t, _ in COLOUR_THINGS[scene.colour]}:
                word = THING_PHRASE.format(thing=word)
        elif scene.texture != "plain" and rng.random() < 0.5:
            kind, word = "texture", scene.texture
        else:
            kind, word = "shape", shape_word
        text = partial_caption(kind, word, bool(rng.random() < 0.5))
    return Sample(render(scene, resolution), text, scene)


def vocabulary() -> list[str]:
    """Every word the captions can use, for the toy model's tokenizer."""
    phrases = [*TEMPLATES, THING_PHRASE, "a shape", *TEXTURES, *OBJECT_COLOURS]
    phrases += [
        w for words in (*COLOUR_WORDS.values(), *COLOUR_THINGS.values(), *SHAPE_WORDS.values()) for w, _ in words
    ]
    words = {word for phrase in phrases for word in phrase.replace("{object}", " ").replace("{thing}", " ").split()}
    return sorted(words - {NEUTRAL})
