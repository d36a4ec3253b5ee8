"""Probe images of every RECE state, in TensorBoard and as PNGs (the paper's Fig. 5, live)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from PIL import Image

from callbacks.probing import EveryState, ProbeSettings, generate_probes, image_grid, slug
from rece_lightning.evaluation.nudity import to_uint8


class ProbeImages(EveryState):
    """Generate images from each epoch's derived embedding c' and from the plain concept prompt.

    Probe ``k`` shows the state after ``k`` derive-erase rounds (``k = 0``: right after the UCE edit), i.e. the model
    *before* epoch ``k``'s erasure and the c' that epoch erases. Logged as one image row per concept under
    ``probe/<concept>/derived`` and ``probe/<concept>/prompt`` at step ``k``, and written as PNGs under
    ``<log_dir>/probes/state_<k>/``.

    Args:
        num_images: images per concept and kind.
        seed: image ``i`` uses seed ``seed + i``, the same for c' and for the prompt.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        height: image height in pixels (multiple of 8).
        width: image width in pixels (multiple of 8).
        save_png: also write the images as PNG files.
    """

    def __init__(
        self,
        num_images: int = 1,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        save_png: bool = True,
    ) -> None:
        self.settings = ProbeSettings(num_images, seed, num_inference_steps, guidance_scale, height, width)
        self.save_png = save_png

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        probes = generate_probes(pl_module, self.settings)
        for kind, images_by_concept in (("derived", probes.derived), ("prompt", probes.prompt)):
            for concept, images in images_by_concept.items():
                for logger in trainer.loggers:
                    add_image = getattr(logger.experiment, "add_image", None)
                    if add_image is not None:
                        tag = f"probe/{slug(concept)}/{kind}"
                        add_image(tag, image_grid(images), global_step=probes.state, dataformats="HWC")
                if self.save_png and trainer.log_dir is not None:
                    folder = Path(trainer.log_dir) / "probes" / f"state_{probes.state:02d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    for index, image in enumerate(images):
                        Image.fromarray(to_uint8(image)).save(folder / f"{slug(concept)}_{kind}_{index}.png")
