"""Loading a diffusers pipeline and reaching its text-reading K/V: the only module that calls ``from_pretrained``.

It finds the pipeline class of a model folder from its ``model_index.json`` and refuses, before anything heavy loads,
a class RECE cannot edit (the policy lives in :mod:`rece_lightning.families`), loads it (hub id or local folder)
through its family's options, and reads and writes the weights of the cross-attention K/V projections that the
family names. Prompt encoding and generation are the family's (:mod:`rece_lightning.families`); token selection is
:mod:`rece_lightning.tokens`; safetensors headers are :mod:`rece_lightning.kv_files`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rece_lightning.families import ModelFamily, family_for_class, family_of
from rece_lightning.families.base import cross_attention_projections
from rece_lightning.validation import check_choice

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config string ("float32", "float16", "bfloat16", "float64") to a torch dtype."""
    return DTYPES[check_choice("dtype", name, sorted(DTYPES))]


def looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is ``org/name``; anything absolute, relative-looking or deeper is meant as a local folder."""
    return (
        os.path.exists(name_or_path)
        or os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") != 1
    )


def model_index(name_or_path: str) -> dict | None:
    """The pipeline folder's ``model_index.json`` (a local folder, or a hub id already in the Hugging Face cache); None
    where it cannot be read without a download."""
    if looks_like_local_path(name_or_path):
        path = Path(name_or_path).expanduser() / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "model_index.json")
    except Exception:  # noqa: BLE001  (no cache, odd id: the class is checked after loading instead)
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def pipeline_class_name(name_or_path: str) -> str | None:
    """The supported pipeline class named by the folder's ``model_index.json`` (None if it cannot be read here)."""
    index = model_index(name_or_path)
    if index is None:
        return None
    class_name = str(index.get("_class_name"))
    family_for_class(class_name, name_or_path)  # refuses an unsupported class, saying why
    return class_name


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names one checkpoint file in the original Stable Diffusion layout (A1111 / civitai),
    which diffusers loads with ``from_single_file``."""
    return isinstance(name_or_path, str) and name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)


def _check_single_file(name_or_path: str, single_file_config: str | None) -> str | None:
    """The pipeline class of a single-file base (from its config folder), or None where diffusers will infer it."""
    if not Path(name_or_path).expanduser().is_file():
        raise FileNotFoundError(f"pretrained_model_name_or_path={name_or_path!r}: no such checkpoint file")
    if single_file_config is None:
        if _hub_offline():
            raise ValueError(
                f"pretrained_model_name_or_path={name_or_path!r} is a single-file checkpoint, and offline diffusers "
                "needs the configs of its architecture to load it: give single_file_config=<a diffusers folder of "
                "the same architecture: model_index.json, the component configs and the tokenizer; no weights "
                "needed>, made where there is network with e.g. `huggingface-cli download "
                "stable-diffusion-v1-5/stable-diffusion-v1-5 --exclude '*.safetensors' '*.bin' '*.ckpt' --local-dir "
                "sd15-config` (SDXL: stabilityai/stable-diffusion-xl-base-1.0)"
            )
        return None
    if (
        looks_like_local_path(single_file_config)
        and not (Path(single_file_config).expanduser() / "model_index.json").is_file()
    ):
        raise FileNotFoundError(
            f"single_file_config={single_file_config!r} is not a diffusers pipeline folder (no model_index.json "
            "there): give the configs of the checkpoint's architecture (a save_pretrained folder; weights not needed)"
        )
    return pipeline_class_name(single_file_config)


def check_pretrained_path(name_or_path: str, single_file_config: str | None = None) -> str | None:
    """Refuse a local folder that is not a saved diffusers pipeline, or a pipeline class RECE cannot edit, before
    anything heavy is loaded; return the pipeline class (None where ``model_index.json`` cannot be read here).

    A ``.safetensors`` / ``.ckpt`` file is a single-file checkpoint: its class comes from ``single_file_config``
    (needed offline)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"pretrained_model_name_or_path={name_or_path!r} is not allowed: give a hub id such as "
            "'CompVis/stable-diffusion-v1-4', a local folder written by save_pretrained, or a single-file checkpoint"
        )
    if is_single_file(name_or_path):
        return _check_single_file(name_or_path, single_file_config)
    if single_file_config is not None:
        raise ValueError(
            f"single_file_config={single_file_config!r} is given but pretrained_model_name_or_path={name_or_path!r} "
            f"is no single-file checkpoint ({' or '.join(SINGLE_FILE_SUFFIXES)}): drop single_file_config"
        )
    if looks_like_local_path(name_or_path) and not (Path(name_or_path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(
            f"pretrained_model_name_or_path={name_or_path!r} is not a diffusers pipeline folder (no model_index.json "
            "there); give a folder written by save_pretrained or a hub id such as 'CompVis/stable-diffusion-v1-4'"
        )
    return pipeline_class_name(name_or_path)


def check_family(name_or_path: str, single_file_config: str | None = None) -> ModelFamily | None:
    """:func:`check_pretrained_path`, then the family of the pipeline class it names (None where
    ``model_index.json`` cannot be read here: a hub id not in the cache, checked once loaded)."""
    class_name = check_pretrained_path(name_or_path, single_file_config)
    return None if class_name is None else family_for_class(class_name, name_or_path)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_downloadable(name_or_path: str) -> None:
    """Refuse, in one line, a hub id that is not in the Hugging Face cache when ``HF_HUB_OFFLINE=1`` forbids the
    download (huggingface_hub would end in a long double traceback). Checked when the model is needed, not when a
    config is read: a config naming a hub model instantiates anywhere."""
    if not looks_like_local_path(name_or_path) and _hub_offline() and model_index(name_or_path) is None:
        raise FileNotFoundError(
            f"pretrained_model_name_or_path={name_or_path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: run `huggingface-cli download {name_or_path}` where there is network (HF_HOME "
            "points to the cache), or give a local folder written by save_pretrained"
        )


def load_tokenizer(name_or_path: str, single_file_config: str | None = None):
    """The pipeline's tokenizer alone: cheap, so prompts can be checked before the models load (a single-file
    checkpoint's comes from its config folder; None if it has none: diffusers fetches it with the model)."""
    from transformers import AutoTokenizer

    if is_single_file(name_or_path):
        if single_file_config is None:
            return None
        name_or_path = single_file_config
    check_downloadable(name_or_path)
    return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path), subfolder="tokenizer")


def load_pipeline(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    single_file_config: str | None = None,
):
    """``from_pretrained`` of the pipeline class the folder's ``model_index.json`` names, with its family's options
    (no safety checker: it would blank the probe images; no SDXL watermark: it would alter them); every network
    frozen and in eval mode. A single-file checkpoint loads through diffusers' ``from_single_file`` with
    ``single_file_config`` (local files only when given, or when offline)."""
    import diffusers

    single_file = is_single_file(name_or_path)
    if single_file:
        class_name = check_pretrained_path(name_or_path, single_file_config)
    else:
        check_downloadable(name_or_path)
        class_name = pipeline_class_name(name_or_path)
    options = family_for_class(class_name, name_or_path).load_options(class_name) if class_name else {}
    path = os.path.expanduser(name_or_path)
    if single_file:
        loader = getattr(diffusers, class_name or "StableDiffusionPipeline")
        config = None if single_file_config is None else os.path.expanduser(single_file_config)
        local = config is not None and looks_like_local_path(config) or _hub_offline()
        pipeline = loader.from_single_file(path, config=config, local_files_only=local, dtype=dtype, **options)
    else:
        pipeline = getattr(diffusers, class_name or "DiffusionPipeline").from_pretrained(path, dtype=dtype, **options)
    family = family_of(pipeline)  # a hub id whose index was not cached: its class is checked now
    pipeline.set_progress_bar_config(disable=True)
    for component in family.networks(pipeline):
        component.requires_grad_(False)
        component.eval()
    if device is not None:
        pipeline.to(device)
    return pipeline


# --- cross-attention K/V -------------------------------------------------------------------------------------------


def denoiser(model) -> nn.Module:
    """The network whose K/V are edited: ``model`` itself if it is one, else its pipeline family's (U-Net or DiT)."""
    return model if isinstance(model, nn.Module) else family_of(model).denoiser(model)


def cross_attention_kv(model) -> dict[str, nn.Linear]:
    """Every text-reading key/value projection of a pipeline or denoiser, by parameter-name prefix, in module order.

    SD 1.x has 16 cross-attention layers, so 32 entries (``...attn2.to_k`` and ``...attn2.to_v``).
    """
    if isinstance(model, nn.Module):
        return cross_attention_projections(model)
    return family_of(model).kv_projections(denoiser(model))


def kv_weights(model) -> dict[str, Tensor]:
    """The K/V weight tensors themselves (not copies) of a pipeline or denoiser, keyed like its ``state_dict()``."""
    return {f"{name}.weight": linear.weight for name, linear in cross_attention_kv(model).items()}


def looks_like_kv_name(name: str) -> bool:
    """Whether ``name`` can be a key of :func:`kv_weights` (checked before any model is loaded)."""
    return name.endswith((".to_k.weight", ".to_v.weight"))


@torch.no_grad()
def write_kv_weights(model, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` into the K/V projections of a pipeline or denoiser in place; names and shapes must match."""
    current = kv_weights(model)
    check_kv_compatible(current, weights)
    for name, value in weights.items():
        current[name].copy_(value.to(device=current[name].device, dtype=current[name].dtype))


def check_kv_compatible(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str = "weights") -> None:
    """Refuse K/V weights from another base model: the layer count, names and shapes must match."""
    if len(expected) != len(given):
        raise ValueError(
            f"{what} hold {len(given)} K/V matrices but this model has {len(expected)} cross-attention K/V "
            "projections: they were made for another base model"
        )
    for name, value in given.items():
        if name not in expected:
            raise ValueError(f"{what} name {name!r}, which this model does not have: made for another base model")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(value.shape)} but this model's is {tuple(expected[name].shape)}: "
                "made for another base model"
            )


class ModelSource(os.PathLike, ABC):
    """A model given by what makes it rather than by a path: :attr:`name_or_path` says where it is or will be, and
    ``os.fspath(source)`` makes it there on first use and returns it (``rece_lightning.testing.TinyPipeline`` builds a
    tiny random pipeline). Accepted wherever ``pretrained_model_name_or_path`` is, as ``class_path`` / ``init_args``
    in a config; nothing is made before the model is needed."""

    @property
    @abstractmethod
    def name_or_path(self) -> str:
        """The folder (or hub id) the model is, or will be, loaded from."""

    @abstractmethod
    def make(self) -> None:
        """Make the model at :attr:`name_or_path` if it is not there yet."""

    def __fspath__(self) -> str:
        self.make()
        return self.name_or_path


def describe_model(name_or_path: str | os.PathLike) -> str:
    """Where a model is or will be loaded from, without making it."""
    if isinstance(name_or_path, ModelSource):
        return name_or_path.name_or_path
    return os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
