"""SDXL: two CLIP text encoders, their penultimate layers concatenated (d = 2048), and a pooled embedding that
conditions the U-Net through its time embedding, outside cross-attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from rece_lightning.families.base import EncodedPrompt, ModelFamily


class StableDiffusionXL(ModelFamily):
    """``StableDiffusionXLPipeline``: the K/V read the concatenated embedding; probes and attacks pass the concept's
    own pooled embedding with any derived one (the text encoders are never edited)."""

    name = "sdxl"
    label = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    embedding_attacks = False  # its pooled embedding conditions the U-Net too; attack outcomes carry none
    lora_pipeline = "StableDiffusionXLPipeline"

    def kohya_base_version(self, text_width: int) -> str:
        return "sdxl_base_v1-0"

    def load_options(self, class_name: str) -> dict[str, Any]:
        return {"add_watermarker": False}  # the invisible watermark would alter the probe and evaluation images

    def encode_batch(self, pipeline, prompts: list[str]) -> list[EncodedPrompt]:
        """``StableDiffusionXLPipeline.encode_prompt`` itself: both encoders and the pooled embedding."""
        tokenizer = pipeline.tokenizer
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        hidden, _, pooled, _ = pipeline.encode_prompt(
            prompts, device=pipeline.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return [EncodedPrompt(hidden[i], int(lengths[i]), pooled[i]) for i in range(len(prompts))]

    def embedding_inputs(
        self, pipeline, embeds: Tensor, pooled: Tensor | None = None, lengths: Sequence[int] | None = None
    ) -> dict[str, Any]:
        if pooled is None:
            raise ValueError("an SDXL pipeline needs a pooled text embedding with prompt_embeds; none was given")
        inputs = super().embedding_inputs(pipeline, embeds)
        unet = pipeline.unet
        inputs["pooled_prompt_embeds"] = pooled.to(unet.device, unet.dtype)
        return inputs
