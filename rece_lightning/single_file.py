"""The erased model as a single-file checkpoint in the layout of the single file it was made from.

A base given as one ``.safetensors`` / ``.ckpt`` in the original Stable Diffusion layout (what AUTOMATIC1111, Forge
and ComfyUI load) is exported the same way: every tensor of the input is copied unchanged, in its own dtype, except
the edited cross-attention K/V, whose keys come from one table
(:mod:`rece_lightning.families.ldm_layout`). A ``.ckpt`` input is written as ``.safetensors`` with the same keys
(no pickle in the output).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rece_lightning.export import write_manifest
from rece_lightning.files import atomic_write, check_writable_folder
from rece_lightning.validation import check_finite_weights

__all__ = ["read_single_file", "save_single_file"]


def read_single_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a single-file checkpoint and its safetensors metadata (a ``.ckpt``'s ``state_dict``)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds no state_dict: it is not a Stable Diffusion checkpoint")
    # cloned: a pickled checkpoint may share storage between tensors, which safetensors refuses to write
    return {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}, {}


def save_single_file(
    folder: str | os.PathLike,
    source: str | os.PathLike,
    weights: Mapping[str, Tensor],
    key_of: Callable[[str], str],
    manifest: Mapping[str, Any],
) -> Path:
    """Copy the single file ``source`` into ``folder`` with the K/V ``weights`` (diffusers names) written at
    ``key_of(name)``; returns the new file. Refuses a K/V key the source lacks or a shape it does not have."""
    check_finite_weights(weights, "refusing to export")
    check_writable_folder("export_dir", folder)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(source).expanduser()
    tensors, metadata = read_single_file(source)
    for name, value in weights.items():
        key = key_of(name)
        if key not in tensors:
            raise KeyError(f"{str(source)!r} has no {key!r} (the original-layout key of {name!r}): not this model")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{key!r} has shape {tuple(tensors[key].shape)} in {str(source)!r}, the edit's is {tuple(value.shape)}"
            )
        tensors[key] = value.detach().to("cpu", tensors[key].dtype).contiguous()
    target = folder / f"{source.stem}_erased.safetensors"
    metadata = {**metadata, "rece_manifest": json.dumps(dict(manifest), sort_keys=True, default=str)}
    atomic_write(target, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))
    write_manifest(folder, manifest, format="single_file", single_file=target.name, single_file_source=str(source))
    return target
