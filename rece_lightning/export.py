"""The erased model as a small artefact: the edited K/V weights in safetensors plus a JSON manifest.

``save_erased`` writes ``rece_kv.safetensors`` (only the cross-attention K/V matrices, keyed as in the
denoiser's ``state_dict()``) and ``rece_manifest.json`` (base model, concepts, hyper-parameters, versions).
``load_erased`` applies such an export, or a Lightning checkpoint of ``RECEModule`` (which stores the shared d x d
transform), to a freshly loaded pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rece_lightning.closed_form import apply_transform
from rece_lightning.diffusion import check_kv_compatible, kv_weights, looks_like_kv_name, write_kv_weights
from rece_lightning.files import DIR_MODE, atomic_write, check_writable_folder
from rece_lightning.kv_files import denoiser_weights_file, read_denoiser_kv
from rece_lightning.validation import check_finite_weights

WEIGHTS_NAME = "rece_kv.safetensors"
MANIFEST_NAME = "rece_manifest.json"
TRANSFORM_KEY = "transform"
BASE_IDENTITY_KEY = "base_kv_identity"  # manifest / checkpoint field: which base K/V an edit was made from
ERASED_IDENTITY_KEY = "erased_kv_identity"  # manifest field: the K/V the edit produces

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "ErasedFile",
    "apply_erased",
    "kv_digest",
    "kv_identity",
    "check_base_identity",
    "check_pipeline_export_folder",
    "load_erased",
    "package_versions",
    "read_checkpoint",
    "read_erased",
    "read_manifest",
    "save_erased",
    "save_erased_pipeline",
    "write_manifest",
]


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("rece-lightning", "torch", "diffusers", "transformers", "lightning", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def kv_digest(weights: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 of K/V weights: names, dtypes, shapes and bytes, in name order (no copy of CPU tensors in their own
    dtype); with ``dtype``, of the weights cast to it."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu", dtype or weights[name].dtype).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


def kv_identity(weights: Mapping[str, Tensor]) -> str:
    """Which K/V weights these are, whatever dtype they were loaded in: :func:`kv_digest` of their float16 values.

    An export records the identity of the base K/V it was made from (and of the K/V it produces), so that applying it
    to another base model (SD 1.4's edit on SD 1.5), or twice, is refused. Hashing float16 values makes the identity
    the same for a base loaded in float32, float16 or float64; a base loaded in bfloat16 rounds differently and has
    another identity (``allow_other_base`` applies the edit anyway).
    """
    return kv_digest(weights, torch.float16)


def write_manifest(folder: Path, manifest: Mapping[str, Any], **fields: Any) -> Path:
    """``folder/rece_manifest.json``: ``manifest`` plus ``fields`` and the package versions, written atomically."""
    full = {**manifest, **fields, "versions": package_versions()}
    path = folder / MANIFEST_NAME
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(full, indent=2, sort_keys=True, default=str)))
    return path


def save_erased(folder: str | os.PathLike, weights: Mapping[str, Tensor], manifest: Mapping[str, Any]) -> Path:
    """Write ``weights`` (K/V name -> tensor) and ``manifest`` into ``folder``; returns the safetensors path."""
    check_finite_weights(weights, "refusing to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in weights.items()}
    weights_path = folder / WEIGHTS_NAME
    atomic_write(
        weights_path,
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "base_model": str(manifest.get("base_model"))}),
    )
    write_manifest(folder, manifest, num_kv_matrices=len(tensors))
    return weights_path


def check_pipeline_export_folder(option: str, folder: str | os.PathLike) -> None:
    """Refuse, before any work, a non-empty folder that a pipeline export would replace but that holds no earlier
    export (``rece_manifest.json``): whatever else is there would be lost."""
    check_writable_folder(option, folder)
    path = Path(folder).expanduser()
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{option}={str(folder)!r} is a non-empty folder that holds no earlier export ({MANIFEST_NAME}); a "
            "diffusers export replaces the whole folder: give a new or empty one"
        )


def save_erased_pipeline(folder: str | os.PathLike, pipeline, manifest: Mapping[str, Any]) -> Path:
    """Write the whole edited ``pipeline`` with ``save_pretrained`` (safetensors) plus ``manifest`` into ``folder``.

    Plain diffusers loads the result with ``from_pretrained``; ``load_erased`` and the evaluator read its K/V. Written
    into a staging folder beside ``folder`` and swapped in at the end, so a failure leaves any earlier export whole.
    """
    check_finite_weights(kv_weights(pipeline), "refusing to export")
    check_pipeline_export_folder("export_dir", folder)
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.staging-"))
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        write_manifest(staging, manifest, format="diffusers")
        os.chmod(staging, DIR_MODE)  # mkdtemp makes 0700 folders
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return folder


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest beside an export (``path`` is the export folder or its safetensors file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return json.loads((folder / MANIFEST_NAME).read_text())


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / MANIFEST_NAME).is_file():
        export_format = json.loads((path / MANIFEST_NAME).read_text()).get("format")
        if export_format == "lora":
            raise ValueError(
                f"{str(path)!r} is a LoRA export: apply it with pipe.load_lora_weights({str(path)!r}); to evaluate "
                "the same edit, give the run's checkpoint (checkpoints/epoch=N.ckpt) or a kv export of it"
            )
        if export_format == "single_file":
            raise ValueError(
                f"{str(path)!r} is a single-file export: it is a whole model; evaluate it as the base model "
                "(pretrained_model_name_or_path=<its .safetensors> with single_file_config, original_only=true), or "
                "give the run's checkpoint"
            )
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: give an export folder holding {WEIGHTS_NAME}, that file, or a RECE "
            "Lightning checkpoint (.ckpt)"
        )
    return path


class ErasedFile(NamedTuple):
    """What :func:`read_erased` found: the file, its K/V weights (an export) or transform (a checkpoint), and the
    identity (:func:`kv_identity`) of the base K/V it was made from, where the file records it."""

    path: Path
    content: dict[str, Tensor] | Tensor
    base_identity: str | None = None
    erased_identity: str | None = None
    concepts: tuple[str, ...] | None = None  # what was erased, where the file says


def read_erased(path: str | os.PathLike) -> ErasedFile:
    """Read and check an erased model without touching any pipeline: its K/V weights (an export) or its transform (a
    ``RECEModule`` checkpoint), with the base identity its manifest or checkpoint records.

    ``path`` may also be another method's edited model as a diffusers pipeline folder (or its ``unet`` /
    ``transformer`` folder): only its cross-attention K/V are read — right for K/V-editing methods (UCE, MACE, RECE)
    and for the derived-embedding attack, which needs only those; a method that changed other weights (ESD) must be
    evaluated as its own base model.

    Refused with an error that names the file: a missing path, a file that does not parse, a file that is not an
    export or a RECE checkpoint, and NaN or inf values (a non-finite export would score as perfect erasure).
    """
    denoiser_file = _pipeline_denoiser_file(path)
    if denoiser_file is not None:
        weights = read_denoiser_kv(denoiser_file)
        if not weights:
            raise ValueError(f"{str(denoiser_file)!r} holds no cross-attention K/V weights ('...attn2.to_k.weight')")
        check_finite_weights(weights, f"{str(denoiser_file)!r}: refusing to evaluate it")
        return ErasedFile(denoiser_file, weights, *_recorded(Path(path).expanduser()))
    path = _resolve(path)
    if path.suffix == ".safetensors":
        try:
            weights = load_file(str(path))
        except Exception as error:  # safetensors raises its own error type for a corrupt header or body
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({error})") from error
        foreign = [name for name in weights if not looks_like_kv_name(name)]
        if not weights or foreign:
            raise ValueError(
                f"{str(path)!r} is not a RECE export: it should hold only cross-attention K/V weights "
                f"('...to_k.weight', '...to_v.weight'); it holds {foreign[:3] or 'nothing'}"
            )
        check_finite_weights(weights, f"{str(path)!r}: refusing to evaluate it")
        return ErasedFile(path, weights, *_recorded(path.parent))
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint)
    if TRANSFORM_KEY not in state:
        raise ValueError(f"{str(path)!r} holds no {TRANSFORM_KEY!r}: it is not a RECEModule checkpoint")
    transform = state[TRANSFORM_KEY].to(torch.float64)
    check_finite_weights({TRANSFORM_KEY: transform}, f"{str(path)!r}: refusing to evaluate it")
    concepts = (checkpoint.get("hyper_parameters") or {}).get("erase_concepts")
    concepts = (concepts,) if isinstance(concepts, str) else (tuple(concepts) if concepts else None)
    return ErasedFile(path, transform, checkpoint.get(BASE_IDENTITY_KEY), None, concepts)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, or a one-line error naming the file (a corrupt or foreign file would
    otherwise end in torch's long ``weights_only`` traceback)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{str(path)!r} is neither a RECE export ({WEIGHTS_NAME}) nor a readable Lightning checkpoint "
            f"({first_line})"
        ) from None  # the message says it all: the command line shows this line alone
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def _recorded(folder: Path) -> tuple[str | None, str | None, tuple[str, ...] | None]:
    """(base identity, erased identity, erased concepts) from the manifest in ``folder``, where there is one."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return None, None, None
    manifest = json.loads(manifest_path.read_text())
    concepts = manifest.get("erase_concepts")
    return manifest.get(BASE_IDENTITY_KEY), manifest.get(ERASED_IDENTITY_KEY), tuple(concepts) if concepts else None


def _pipeline_denoiser_file(path: str | os.PathLike) -> Path | None:
    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / WEIGHTS_NAME).is_file():
        return None
    if not ((folder / "model_index.json").is_file() or (folder / "config.json").is_file()):
        return None
    found = denoiser_weights_file(str(folder))
    if found is None:
        raise FileNotFoundError(
            f"{str(folder)!r} looks like a diffusers model folder but has no single unet or transformer "
            "diffusion_pytorch_model*.safetensors to read K/V weights from"
        )
    return found


@torch.no_grad()
def load_erased(pipeline, path: str | os.PathLike, allow_other_base: bool = False):
    """Apply an erased model to ``pipeline`` (freshly loaded from the same base model) in place, and return it.

    ``path``: an export folder, its ``rece_kv.safetensors``, or a ``RECEModule`` Lightning checkpoint. A file that
    :func:`read_erased` refuses, a K/V set made for another base model (layer count, names or shapes; or, where the
    export records it, other base weights of the same shapes), or an edit the pipeline already holds is refused with
    an error before anything changes. ``allow_other_base=True`` applies an edit to another base on purpose (with a
    warning).
    """
    return apply_erased(pipeline, read_erased(path), allow_other_base=allow_other_base)


@torch.no_grad()
def apply_erased(pipeline, erased: ErasedFile, allow_other_base: bool = False):
    """:func:`load_erased` for what :func:`read_erased` already read."""
    path, content = erased.path, erased.content
    current = kv_weights(pipeline)
    if isinstance(content, dict):
        check_kv_compatible(current, content, what=f"export {path.name}")
    else:
        width = next(iter(current.values())).shape[1]
        if content.shape != (width, width):
            raise ValueError(
                f"checkpoint transform is {tuple(content.shape)} but this U-Net's K/V matrices take d={width} "
                "inputs: it was made for another base model"
            )
    if erased.base_identity is not None:  # hashing the K/V costs a pass over them: only where it is compared
        check_base_identity(kv_identity(current), erased, allow_other_base)
    if isinstance(content, dict):
        weights = content
    else:
        weights = {name: apply_transform(w, content) for name, w in current.items()}
    write_kv_weights(pipeline, weights)
    return pipeline


def check_base_identity(identity: str, erased: ErasedFile, allow_other_base: bool = False) -> None:
    """Refuse to apply ``erased`` to K/V weights whose :func:`kv_identity` is ``identity`` when it records another
    base (or when they already are its result); ``allow_other_base`` turns the first refusal into a warning."""
    if erased.base_identity is None or identity == erased.base_identity:
        return
    if identity == erased.erased_identity:
        raise ValueError(
            f"{str(erased.path)!r}: this pipeline already holds that edit (its K/V are the export's own); load the "
            "base model afresh instead of applying the edit twice"
        )
    message = (
        f"{str(erased.path)!r} was made from other base weights (K/V identity {erased.base_identity[:12]}…) than this "
        f"pipeline's ({identity[:12]}…): another model of the same shapes (SD 1.4 vs 1.5), or weights already edited, "
        "on which the edit would compound"
    )
    if not allow_other_base:
        raise ValueError(message + "; load the base it was made from, or pass allow_other_base=True to apply it anyway")
    warnings.warn(message + "; applying it anyway (allow_other_base=True)", stacklevel=3)
