"""Probe images of every RECE state, in TensorBoard and as PNGs (the paper's Fig. 5, live)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from PIL import Image

from callbacks.probing import EveryState, ProbeSettings, check_probe_settings, generate_probes, image_grid, slug
from rece_lightning.evaluation.nudity import to_uint8


class ProbeImages(EveryState):
    """Generate images from each epoch's derived embedding c' and from the plain concept prompt.

    Probe ``k`` shows the state after ``k`` derive-erase rounds (``k = 0``: right after the UCE edit), i.e. the model
    *before* epoch ``k``'s erasure and the c' that epoch erases. Logged as one image row per concept under
    ``probe/<concept>/derived`` and ``probe/<concept>/prompt`` at step ``k``, and written as PNGs under
    ``<log_dir>/probes/state_<k>/``.

    Args:
        probe: how probes are sampled (:class:`~callbacks.probing.ProbeSettings`: ``num_images``, ``seed``,
            ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``); give the same object to every
            callback (a YAML anchor) and the images of a state are generated once for all of them.
        save_png: also write the images as PNG files.
    """

    def __init__(
        self,
        probe: ProbeSettings | None = None,
        save_png: bool = True,
    ) -> None:
        self.settings = check_probe_settings(probe)
        self.save_png = save_png

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_epoch: bool) -> None:
        probes = generate_probes(pl_module, self.settings)
        log_dir = trainer.log_dir  # on every process: it is a collective under DDP
        for kind, images_by_concept in (("derived", probes.derived), ("prompt", probes.prompt)):
            for concept, images in images_by_concept.items():
                for logger in trainer.loggers:
                    add_image = getattr(logger.experiment, "add_image", None)
                    if add_image is not None:
                        tag = f"probe/{slug(concept)}/{kind}"
                        add_image(tag, image_grid(images), global_step=probes.state, dataformats="HWC")
                if self.save_png and trainer.is_global_zero and log_dir is not None:
                    folder = Path(log_dir) / "probes" / f"state_{probes.state:02d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    for index, image in enumerate(images):
                        Image.fromarray(to_uint8(image)).save(folder / f"{slug(concept)}_{kind}_{index}.png")
