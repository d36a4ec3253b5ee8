"""Model families: one adapter per family of pipelines whose denoiser reads text through cross-attention K/V.

``family_for_class`` finds the adapter of a pipeline class name (from a folder's ``model_index.json``) and refuses,
saying why, the families RECE's closed form does not fit; ``family_of`` finds a loaded pipeline's.
"""

from __future__ import annotations

from rece_lightning.families.base import ENCODE_BATCH, EncodedPrompt, ModelFamily
from rece_lightning.families.pixart import PixArt
from rece_lightning.families.sdxl import StableDiffusionXL
from rece_lightning.families.stable_diffusion import StableDiffusion

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, PixArt)
# Families whose transformer attends jointly over text and image tokens (MM-DiT): no cross-attention K/V reads a
# text embedding, which is what RECE's closed form edits; refused with that reason.
_JOINT_ATTENTION = ("StableDiffusion3", "Flux", "SD3", "AuraFlow", "QwenImage")
# Cross-attention DiTs without an adapter yet: RECE applies, their text encoders need one.
_CROSS_ATTENTION_DIT = ("Sana", "HunyuanDiT", "Lumina")


def supported_classes() -> dict[str, str]:
    """Pipeline class name -> family label, for every supported class."""
    return {name: family.label for family in FAMILIES for name in family.pipeline_classes}


def family_for_class(class_name: str, name_or_path: str = "the model") -> ModelFamily:
    """The adapter of ``class_name``; refuses a class RECE cannot edit, saying why and listing the supported ones."""
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family(class_name) if family is PixArt else family()
    supported = ", ".join(f"{name} ({label})" for name, label in supported_classes().items())
    if any(f.lower() in class_name.lower() for f in _CROSS_ATTENTION_DIT):
        raise ValueError(
            f"{name_or_path!r} is a {class_name}, which is not supported yet: its transformer's attn2 is a "
            "cross-attention over the projected text embedding, so RECE's closed form applies, but encoding its "
            "prompts needs a model-family adapter (rece_lightning/families/) this version lacks; "
            f"supported: {supported}"
        )
    if any(f.lower() in class_name.lower() for f in _JOINT_ATTENTION):
        raise ValueError(
            f"{name_or_path!r} is a {class_name}: a transformer with joint (MM-DiT) attention over text and image "
            "tokens, which has no cross-attention key/value projections reading the text embedding. RECE and UCE "
            f"edit exactly those (attn2.to_k / attn2.to_v), so this model is not supported; supported: {supported}"
        )
    raise ValueError(f"{name_or_path!r} is a {class_name!r}, which is not supported: give a pipeline of {supported}")


def family_of(pipeline) -> ModelFamily:
    """The adapter of a loaded pipeline (by its class)."""
    return family_for_class(type(pipeline).__name__, getattr(pipeline, "name_or_path", None) or "the pipeline")


def encode_prompts(pipeline, prompts) -> list[EncodedPrompt]:
    """``prompts`` encoded by ``pipeline``'s family, as its K/V read them."""
    return family_of(pipeline).encode(pipeline, prompts)


__all__ = [
    "ENCODE_BATCH",
    "FAMILIES",
    "EncodedPrompt",
    "ModelFamily",
    "PixArt",
    "StableDiffusion",
    "StableDiffusionXL",
    "family_for_class",
    "encode_prompts",
    "family_of",
    "supported_classes",
]
