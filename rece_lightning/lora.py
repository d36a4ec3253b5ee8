"""The erased model as a LoRA on every cross-attention K/V matrix, in the layouts diffusers and kohya-ss read.

Every edited K/V matrix is ``W_orig @ M`` with one shared d x d ``M`` (:mod:`rece_lightning.closed_form`), so with
``M - I = up @ down`` (its truncated SVD, :func:`~rece_lightning.closed_form.low_rank_update`) the edit is exactly
``W_orig + (W_orig @ up) @ down``: a LoRA with ``lora_B = W_orig @ up`` per matrix and one ``lora_A = down``. At the
edit's numerical rank it reproduces the erased K/V to float32 rounding; a smaller ``rank`` keeps the top singular
directions.

Two files, one edit:

* ``pytorch_lora_weights.safetensors``: diffusers' PEFT layout (``unet.<module>.lora_A.weight``), written by the
  pipeline class's own ``save_lora_weights``; ``pipeline.load_lora_weights(folder)`` applies it, no project code.
* ``rece_lora_kohya.safetensors``: the kohya-ss layout (``lora_unet_<module>.lora_down.weight`` / ``lora_up`` /
  ``alpha``) that AUTOMATIC1111, Forge and ComfyUI read from their ``models/Lora`` folder (diffusers reads it too).

Both scale 1 (``alpha`` = rank): applying the LoRA at strength 1 gives the erased model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import save_file
from torch import Tensor

from rece_lightning.closed_form import low_rank_update
from rece_lightning.export import write_manifest
from rece_lightning.families import ModelFamily
from rece_lightning.files import atomic_write, check_writable_folder

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
KOHYA_LORA_NAME = "rece_lora_kohya.safetensors"
LORA_DTYPE = torch.float32  # what LoRA tools expect; they cast to the model's dtype when applying

__all__ = ["DIFFUSERS_LORA_NAME", "KOHYA_LORA_NAME", "LoraLayers", "check_lora_rank", "lora_layers", "save_lora"]


def check_lora_rank(rank: Any, text_width: int | None = None) -> int | None:
    """``rank`` if it is None (the edit's own rank) or a whole number in [1, d]; refuses anything else by name."""
    if rank is None:
        return None
    upper = f"d = {text_width}" if text_width else "d, the width of the embeddings the K/V read"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or (text_width and rank > text_width):
        raise ValueError(
            f"lora_rank={rank!r} is not allowed: a LoRA rank is a whole number in [1, {upper}], or null for the "
            "edit's own rank (exact)"
        )
    return rank


@dataclass(frozen=True)
class LoraLayers:
    """One LoRA per K/V matrix (name -> ``(lora_A, lora_B)``), its rank and how close it comes to the edit.

    ``relative_error``: the largest ``||W_orig + lora_B lora_A - W_orig M||_F / ||W_orig M||_F`` over the matrices,
    with the factors as stored (float32).
    """

    layers: dict[str, tuple[Tensor, Tensor]]
    rank: int
    full_rank: int
    kept_energy: float
    relative_error: float

    def record(self) -> dict[str, Any]:
        """The manifest's fields for this LoRA."""
        return {
            "lora_rank": self.rank,
            "lora_full_rank": self.full_rank,
            "lora_kept_energy": self.kept_energy,
            "lora_relative_error": self.relative_error,
        }


@torch.no_grad()
def lora_layers(original_kv: Mapping[str, Tensor], transform: Tensor, rank: int | None = None) -> LoraLayers:
    """The LoRA factors of the state ``W_orig @ transform`` (``rank=None``: the edit's numerical rank, exact)."""
    update = low_rank_update(transform, rank)
    if update.rank == 0:
        raise ValueError("the state is the unedited model (transform = I): there is no edit to write as a LoRA")
    down = update.down.to("cpu", LORA_DTYPE).contiguous()
    down64, up_factor = down.to(torch.float64), update.up.to("cpu")
    transform64 = transform.detach().to("cpu", torch.float64)
    layers, worst = {}, 0.0
    for name, weight in original_kv.items():
        weight64 = weight.detach().to("cpu", torch.float64)
        up = (weight64 @ up_factor).to(LORA_DTYPE).contiguous()
        erased = weight64 @ transform64
        error = torch.linalg.matrix_norm(weight64 + up.to(torch.float64) @ down64 - erased)
        worst = max(worst, float(error / torch.linalg.matrix_norm(erased).clamp_min(1e-300)))
        layers[name] = (down, up)
    return LoraLayers(layers, update.rank, update.full_rank, update.kept_energy, worst)


def save_lora(
    folder: str | os.PathLike,
    family: ModelFamily,
    lora: LoraLayers,
    manifest: Mapping[str, Any],
) -> Path:
    """Write ``lora`` in diffusers' and kohya's layouts plus ``manifest`` into ``folder``; returns the diffusers file.

    Each file is written whole or not at all (:func:`~rece_lightning.files.atomic_write`).
    """
    if family.lora_pipeline is None:
        raise ValueError(f"{family.label} has no LoRA loader in diffusers: export_format=lora is not available for it")
    check_writable_folder("export_dir", folder)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    rank = str(lora.rank)
    # diffusers' own writer, into a staging folder, then moved into place
    pipeline_class = getattr(diffusers, family.lora_pipeline)
    peft_layers = {}
    for name, (down, up) in lora.layers.items():
        module = name.removesuffix(".weight")
        peft_layers[f"{module}.lora_A.weight"] = down.clone()  # safetensors refuses tensors that share storage
        peft_layers[f"{module}.lora_B.weight"] = up
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-staging-") as staging:
        pipeline_class.save_lora_weights(staging, unet_lora_layers=peft_layers, weight_name=DIFFUSERS_LORA_NAME)
        atomic_write(folder / DIFFUSERS_LORA_NAME, lambda tmp: os.replace(Path(staging) / DIFFUSERS_LORA_NAME, tmp))
    kohya: dict[str, Tensor] = {}
    for name, (down, up) in lora.layers.items():
        module = family.kohya_module_name(name)
        kohya[f"{module}.lora_down.weight"] = down.clone()  # safetensors refuses tensors that share storage
        kohya[f"{module}.lora_up.weight"] = up
        kohya[f"{module}.alpha"] = torch.tensor(float(lora.rank), dtype=LORA_DTYPE)  # scale alpha / rank = 1
    text_width = next(iter(lora.layers.values()))[0].shape[1]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": rank,
        "ss_base_model_version": family.kohya_base_version(text_width),
        "ss_output_name": "rece_lora_kohya",
        "rece_manifest": json.dumps(dict(manifest), sort_keys=True, default=str),
    }
    atomic_write(folder / KOHYA_LORA_NAME, lambda tmp: save_file(kohya, tmp, metadata=metadata))
    write_manifest(folder, manifest, **lora.record(), format="lora")
    return folder / DIFFUSERS_LORA_NAME
