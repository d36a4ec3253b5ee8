"""What a model family answers for RECE: how prompts become the vectors the text-reading K/V see, and back.

RECE's closed form (``closed_form``) needs only the matrices that read text (cross-attention ``to_k`` / ``to_v``) and
the vectors that feed them. Families differ in everything around that: the text encoder(s), a pooled embedding, a
caption projection between encoder and attention, the denoiser's name and the pipeline's own image size. One
subclass per family answers those questions; nothing else in the package asks which family a pipeline is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rece_lightning.families.ldm_layout import original_kv_key

ENCODE_BATCH = 64  # prompts per text-encoder call: thousands of concepts encode in batches, not all at once


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt as the K/V projections read it: ``embedding`` (max_length, d) over every position, and the number
    of real tokens (``length``: BOS, if the tokenizer has one, and EOS included).

    ``pooled``: a pooled text embedding that conditions the denoiser outside cross-attention (SDXL's, through its time
    embedding); None for families without one.
    """

    embedding: Tensor
    length: int
    pooled: Tensor | None = None


def cross_attention_projections(denoiser: nn.Module) -> dict[str, nn.Linear]:
    """The ``to_k`` / ``to_v`` of each ``Attention`` that says it is a cross-attention, by parameter-name prefix, in
    module order (SD 1.x: 16 layers, 32 entries ``...attn2.to_k`` / ``...attn2.to_v``)."""
    from diffusers.models.attention_processor import Attention

    projections: dict[str, nn.Linear] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            projections[f"{name}.to_k"] = module.to_k
            projections[f"{name}.to_v"] = module.to_v
    if not projections:
        raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers: RECE edits only those")
    return projections


class ModelFamily(ABC):
    """One family of text-to-image pipelines whose denoiser reads text through cross-attention K/V.

    Attributes:
        name: the family's short name (``sd``, ``sdxl``, ``pixart``).
        label: how messages name it (``SD 1.x / 2.x``).
        pipeline_classes: the diffusers pipeline classes of the family.
        denoiser_name: the pipeline attribute holding the network whose K/V are edited (``unet``, ``transformer``).
        token_attacks: whether token-level red-team attacks (UnlearnDiff, Ring-A-Bell) can drive its text encoder:
            one CLIP-style encoder whose output feeds the K/V directly.
        embedding_attacks: whether an attack's embedding alone generates images (SDXL also needs a pooled embedding,
            which attack outcomes do not carry).
        attends_padding: whether the K/V read every position (CLIP-conditioned U-Nets) or only the real tokens (an
            attention mask, as PixArt's T5 prompts have).
        lora_pipeline: the diffusers pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` carry a LoRA
            on the denoiser's K/V, or None where diffusers has no LoRA loader for the family.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    denoiser_name: ClassVar[str] = "unet"
    token_attacks: ClassVar[bool] = False
    embedding_attacks: ClassVar[bool] = True
    attends_padding: ClassVar[bool] = True
    lora_pipeline: ClassVar[str | None] = None

    # --- loading ---------------------------------------------------------------------------------------------------

    def load_options(self, class_name: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords (no safety checker: it would blank the probe images)."""
        return {}

    def networks(self, pipeline) -> list[nn.Module]:
        """Every network of the pipeline (frozen and put in eval mode after loading)."""
        names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
        return [getattr(pipeline, name) for name in names if isinstance(getattr(pipeline, name, None), nn.Module)]

    # --- what is edited --------------------------------------------------------------------------------------------

    def denoiser(self, pipeline) -> nn.Module:
        return getattr(pipeline, self.denoiser_name)

    def kv_projections(self, denoiser: nn.Module) -> dict[str, nn.Linear]:
        """Every text-reading key/value projection of ``denoiser`` (:func:`cross_attention_projections`)."""
        return cross_attention_projections(denoiser)

    def kohya_module_name(self, kv_name: str) -> str:
        """The kohya-ss / A1111 / ComfyUI name of the LoRA on K/V matrix ``kv_name``: ``lora_unet_`` and the module's
        diffusers path with ``_`` for ``.`` (the layout kohya's sd-scripts write for SD 1.x/2.x; A1111, ComfyUI and
        diffusers' own converter map it onto the U-Net)."""
        return "lora_unet_" + kv_name.removesuffix(".weight").replace(".", "_")

    def single_file_kv_key(self, kv_name: str, denoiser_config: Any) -> str:
        """The key of K/V matrix ``kv_name`` in a single-file checkpoint of the original layout
        (:mod:`~rece_lightning.families.ldm_layout`)."""
        return original_kv_key(kv_name, int(denoiser_config.layers_per_block))

    def kohya_base_version(self, text_width: int) -> str:
        """kohya's ``ss_base_model_version`` for a model whose K/V read ``text_width``-wide embeddings."""
        return "sd_v2" if text_width == 1024 else "sd_v1"

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenizer(self, pipeline):
        return pipeline.tokenizer

    def max_length(self, tokenizer) -> int:
        """Token positions of an encoded prompt (CLIP: the tokenizer's 77)."""
        return int(tokenizer.model_max_length)

    def encoding_modules(self, pipeline) -> dict[str, nn.Module]:
        """The networks an encoding depends on (they key the encodings cache)."""
        names = ("text_encoder", "text_encoder_2")
        return {name: getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None}

    @abstractmethod
    def encode_batch(self, pipeline, prompts: list[str]) -> list[EncodedPrompt]:
        """One batch of prompts, padded to :meth:`max_length`, exactly as the pipeline conditions on them."""

    @torch.no_grad()
    def encode(self, pipeline, prompts: Sequence[str], batch_size: int = ENCODE_BATCH) -> list[EncodedPrompt]:
        """Encode ``prompts`` in batches of ``batch_size``."""
        prompts = list(prompts)
        encoded: list[EncodedPrompt] = []
        for start in range(0, len(prompts), batch_size):
            encoded += self.encode_batch(pipeline, prompts[start : start + batch_size])
        return encoded

    def token_embeddings(self, pipeline) -> Tensor:
        """The (first) text encoder's input token embedding table (V, d_token): which words are near which."""
        return pipeline.text_encoder.get_input_embeddings().weight

    # --- generation ------------------------------------------------------------------------------------------------

    def default_image_size(self, pipeline) -> int:
        """The pipeline's own image side (512 for SD 1.x, 768 for SD 2.x-768, 1024 for SDXL)."""
        return int(self.denoiser(pipeline).config.sample_size) * int(pipeline.vae_scale_factor)

    def call_options(self, pipeline) -> dict[str, Any]:
        """Keywords every generation call passes (sizes are the caller's, never silently binned)."""
        return {}

    def embedding_inputs(
        self, pipeline, embeds: Tensor, pooled: Tensor | None = None, lengths: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Keywords that make ``pipeline(...)`` generate from (N, T, d) K/V-input embeddings instead of prompts."""
        denoiser = self.denoiser(pipeline)
        return {"prompt_embeds": embeds.to(denoiser.device, denoiser.dtype)}

    def reading_embeddings(self, pipeline) -> AbstractContextManager:
        """While generating from K/V-input embeddings: whatever must be bypassed between them and the K/V."""
        return nullcontext()

    def generate(
        self,
        pipeline,
        prompts: Sequence[str] | None = None,
        embeds: Tensor | None = None,
        pooled: Tensor | None = None,
        lengths: Sequence[int] | None = None,
        **sampling: Any,
    ):
        """``pipeline(...)`` from ``prompts`` or from K/V-input ``embeds`` (with their ``pooled`` embedding where the
        family has one and their token ``lengths`` where it masks padding); ``sampling``: steps, guidance, size,
        generators, output type. Returns the pipeline's output."""
        if (prompts is None) == (embeds is None):
            raise ValueError("generate: give prompts or embeds, not both or neither")
        options = {**self.call_options(pipeline), **sampling}
        if prompts is not None:
            return pipeline(prompt=list(prompts), **options)
        inputs = self.embedding_inputs(pipeline, embeds, pooled, lengths)  # before the bypass: it may encode
        with self.reading_embeddings(pipeline):
            return pipeline(**inputs, **options)

    # --- token-level attacks ---------------------------------------------------------------------------------------

    def text_encoder(self, pipeline) -> nn.Module:
        """The one text encoder that token-level attacks drive (families with ``token_attacks`` only)."""
        raise NotImplementedError(
            f"{self.label}: the token-level attacks drive one CLIP text encoder, which this family does not have"
        )

    def predict_noise(self, pipeline, latents: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        """The denoiser's noise prediction conditioned on K/V-input ``embeds`` (families with ``token_attacks``)."""
        raise NotImplementedError(f"{self.label}: no noise prediction for token-level attacks")
