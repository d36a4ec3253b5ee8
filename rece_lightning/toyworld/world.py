"""A procedural world of coloured shapes, where erasing a concept can be seen and measured offline.

Every scene is one object on a plain light background: a colour (red, green, blue, yellow, or the unnamed grey), a
shape (circle, square, triangle) and a texture (plain, striped) that plays the part of an artistic style. Scenes are
drawn from a seeded generator, so scene ``i`` of a seed is the same everywhere; each comes with its ground-truth labels
and a caption from one of several templates ("a red circle", "a photo of a striped blue square", "red square on a
white background", "a circle", ...).

A caption names a colour exactly when the object has one: objects whose caption names no colour are grey. So a prompt
stripped of its colour word has a default that is not the concept ("a circle" draws a grey circle), as "a woman" draws
a clothed woman in Stable Diffusion, and erasing "red" towards the empty prompt has somewhere clean to go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 200, 25),
}
# The colour of objects whose caption names none (never a word of the captions).
NEUTRAL = "grey"
# Lighter than every colour but yellow and darker than yellow (luminance 155 against red 89, blue 80, green 111,
# yellow 190): a mid grey of 118 sat next to green and came out greenish at guidance 5 (green / grey confused).
NEUTRAL_RGB = (155, 155, 155)
NEUTRAL_SHARE = 0.25  # share of scenes with a grey object
OBJECT_COLOURS: tuple[str, ...] = (*COLOURS, NEUTRAL)  # every colour an object can have
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEXTURES: tuple[str, ...] = ("plain", "striped")
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
# Coloured objects' partial captions name their colour ("red", "a red shape"); grey objects' name their shape or
# texture ("a circle", "striped").
PARTIAL_SHARE = 0.2
RESOLUTION = 32
STRIPE_PERIOD = 8  # pixels at 32 px: 4 light + 4 dark rows, wide enough for a VAE with a factor-4 latent
DARK_SHADE = 0.45  # striped objects alternate the colour and this fraction of it
_SUPERSAMPLE = 4


def check_choice(kind: str, value: str, allowed) -> str:
    """Refuse an attribute value the world does not have, naming it and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{kind}={value!r} is not in the toy world: choose one of {list(allowed)}")
    return value


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


def object_phrase(colour: str, shape: str, texture: str, texture_word: bool = False) -> str:
    """ "red circle", "striped red circle", "plain red circle" where the plain texture is named; grey is unnamed."""
    prefix = "striped " if texture == "striped" else ("plain " if texture_word else "")
    return f"{prefix}{shape}" if colour == NEUTRAL else f"{prefix}{colour} {shape}"


def caption(scene: Scene, template: int = 0, texture_word: bool = False) -> str:
    """The scene's caption with ``TEMPLATES[template]``; "plain" is said only when ``texture_word``."""
    phrase = object_phrase(scene.colour, scene.shape, scene.texture, texture_word)
    text = TEMPLATES[template].format(object=phrase)
    return text


def partial_caption(scene: Scene, kind: str, article: bool) -> str:
    """A caption naming only the scene's ``kind`` attribute: "red", "a red shape", "circle", "a striped shape"."""
    word = {"colour": scene.colour, "shape": scene.shape, "texture": scene.texture}[kind]
    if not article:
        return word
    return f"a {word}" if kind == "shape" else f"a {word} shape"


def sample_scene(
    rng: np.random.Generator, colour: str | None = None, shape: str | None = None, texture: str | None = None
) -> Scene:
    """A random scene; attributes left as None are drawn at random (grey with ``NEUTRAL_SHARE``, else uniformly)."""
    if colour is None:
        colour = NEUTRAL if rng.random() < NEUTRAL_SHARE else str(rng.choice(list(COLOURS)))
    half = float(rng.uniform(6.0, 11.0))
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
        tint=tuple(int(t) for t in rng.integers(-18, 19, size=3)),
    )


def _mask(scene: Scene, size: int) -> np.ndarray:
    scale = size / RESOLUTION
    coords = (np.arange(size) + 0.5) / scale  # pixel centres in 32-px units
    x, y = np.meshgrid(coords, coords)
    cx, cy = scene.center
    h = scene.half_size
    if scene.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h**2
    if scene.shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # an upright isosceles triangle filling half its bounding box: apex at the top, base at the bottom
    top, bottom = cy - h, cy + h
    half_width = h * (y - top) / (2 * h)
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB image, anti-aliased by supersampling."""
    size = resolution * _SUPERSAMPLE
    mask = _mask(scene, size)
    rgb = NEUTRAL_RGB if scene.colour == NEUTRAL else COLOURS[scene.colour]
    tint = np.array(scene.tint) if scene.colour != NEUTRAL else np.full(3, scene.tint[0])  # grey stays grey
    colour = np.clip(np.array(rgb) + tint, 0, 255).astype(np.float32)
    canvas = np.full((size, size, 3), float(scene.background), dtype=np.float32)
    fill = np.broadcast_to(colour, canvas.shape).copy()
    if scene.texture == "striped":
        rows = (np.arange(size) + 0.5) / (size / RESOLUTION) + scene.stripe_phase
        dark = (rows // (STRIPE_PERIOD / 2)) % 2 == 1
        fill[dark] *= DARK_SHADE
    canvas[mask] = fill[mask]
    image = canvas.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


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
    texture_word = scene.texture == "plain" and rng.random() < 0.3
    text = caption(scene, template, texture_word)
    if rng.random() < PARTIAL_SHARE:
        if scene.colour != NEUTRAL:
            kind = "colour"
        else:
            kind = str(rng.choice(("shape", "texture") if scene.texture == "striped" else ("shape",)))
        text = partial_caption(scene, kind, bool(rng.random() < 0.5))
    return Sample(render(scene, resolution), text, scene)


def all_prompts() -> list[str]:
    """Every caption the world can write (what the toy model is trained on), in a fixed order."""
    prompts = []
    for template in TEMPLATES:
        for colour in OBJECT_COLOURS:
            for shape in SHAPES:
                for texture, word in (("plain", False), ("plain", True), ("striped", False)):
                    prompts.append(template.format(object=object_phrase(colour, shape, texture, word)))
    for colour in COLOURS:
        prompts += [colour, f"a {colour} shape"]
    for shape in SHAPES:
        prompts += [shape, f"a {shape}"]
    prompts += ["striped", "a striped shape"]
    return list(dict.fromkeys(prompts))


def vocabulary() -> list[str]:
    """The words of every caption, for the toy model's tokenizer."""
    return sorted({word for prompt in all_prompts() for word in prompt.split()})
