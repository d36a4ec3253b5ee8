"""The one table between diffusers' U-Net names and the original Stable Diffusion (LDM / SGM) layout of a single-file
checkpoint, for the cross-attention K/V that an erasure edits.

A single-file checkpoint (A1111, ComfyUI, civitai) keeps the U-Net under ``model.diffusion_model.`` in the original
block numbering: ``input_blocks.<n>.1`` holds a down block's attention, ``middle_block.1`` the middle one,
``output_blocks.<n>.1`` an up block's. With L = ``layers_per_block`` (SD 1.x/2.x and SDXL: 2), the down block ``i``'s
attention ``j`` is ``input_blocks.(L+1)i+j+1`` and the up block ``i``'s (L + 1 layers) is ``output_blocks.(L+1)i+j``;
everything inside the transformer keeps its name. Exactly the inverse of diffusers' own converter
(``convert_ldm_unet_checkpoint``), which the single-file test checks.
"""

from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."

_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.attentions\.0\.(.+)")

__all__ = ["UNET_PREFIX", "original_kv_key"]


def original_kv_key(kv_name: str, layers_per_block: int) -> str:
    """The single-file key of the diffusers U-Net K/V weight ``kv_name`` (e.g.
    ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`` ->
    ``model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight``)."""
    per = layers_per_block + 1
    if match := _DOWN.fullmatch(kv_name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"{UNET_PREFIX}input_blocks.{per * block + layer + 1}.1.{rest}"
    if match := _UP.fullmatch(kv_name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"{UNET_PREFIX}output_blocks.{per * block + layer}.1.{rest}"
    if match := _MID.fullmatch(kv_name):
        return f"{UNET_PREFIX}middle_block.1.{match[1]}"
    raise ValueError(f"{kv_name!r} is not a U-Net attention weight of the original layout's down, mid or up blocks")
