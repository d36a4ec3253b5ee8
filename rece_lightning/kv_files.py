"""K/V weights read from a pipeline folder's safetensors without loading any model: the denoiser's file, the K/V
shapes of its header (so a misfit export is refused before a model loads) and the K/V of another method's model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rece_lightning.diffusion import check_kv_compatible, looks_like_kv_name, looks_like_local_path

DENOISER_FOLDERS = ("unet", "transformer")  # U-Net families, diffusion transformers (PixArt)
WEIGHTS_GLOB = "diffusion_pytorch_model*.safetensors"


def denoiser_weights_file(name_or_path: str | os.PathLike) -> Path | None:
    """The single denoiser safetensors file of a diffusers pipeline folder (its ``unet`` or ``transformer`` folder),
    or of a denoiser folder itself; None if there is no such file here (a hub id not in the cache, sharded or
    variant-named weights)."""
    folder = Path(os.path.expanduser(str(name_or_path)))
    if looks_like_local_path(str(name_or_path)):
        for candidate_folder in (*(folder / name for name in DENOISER_FOLDERS), folder):
            candidates = sorted(candidate_folder.glob(WEIGHTS_GLOB))
            if len(candidates) == 1 and (candidate_folder / "config.json").is_file():
                return candidates[0]
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for subfolder in DENOISER_FOLDERS:
            cached = try_to_load_from_cache(
                str(name_or_path), "diffusion_pytorch_model.safetensors", subfolder=subfolder
            )
            if isinstance(cached, str):
                return Path(cached)
    except Exception:  # noqa: BLE001  (no cache, odd id: callers fall back to loading the model)
        return None
    return None


def is_cross_attention_kv(name: str) -> bool:
    # diffusers names cross-attention attn2 in every SD U-Net and in PixArt's transformer blocks
    return looks_like_kv_name(name) and ".attn2." in name


def base_kv_shapes(name_or_path: str) -> dict[str, tuple[int, ...]] | None:
    """The base model's K/V shapes read from its denoiser's safetensors header, without loading it (a local folder or
    a hub id already in the Hugging Face cache); None where the file cannot be found without a download."""
    from safetensors import safe_open

    path = denoiser_weights_file(name_or_path)
    if path is None:
        return None
    with safe_open(str(path), framework="pt") as handle:
        return {
            name: tuple(handle.get_slice(name).get_shape())
            for name in handle.keys()  # noqa: SIM118  (safe_open has keys(), not iteration)
            if is_cross_attention_kv(name)
        }


def read_denoiser_kv(path: Path) -> dict[str, Tensor]:
    """Only the cross-attention K/V weights of a denoiser safetensors file (another method's edited model)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if is_cross_attention_kv(name)}  # noqa: SIM118


def check_kv_fit_before_loading(name_or_path: str, weights: Mapping[str, Tensor], what: str = "weights") -> None:
    """Refuse K/V weights that do not fit the base model's denoiser, from its file header, before any model loads."""
    shapes = base_kv_shapes(name_or_path)
    if shapes is None:
        return
    expected = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    check_kv_compatible(expected, weights, what=f"{what} (base model {name_or_path!r})")
