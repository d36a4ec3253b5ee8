"""SD 1.x / 2.x: one CLIP text encoder whose last hidden state feeds the U-Net's cross-attention K/V directly."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from rece_lightning.families.base import EncodedPrompt, ModelFamily


class StableDiffusion(ModelFamily):
    """``StableDiffusionPipeline``: d = 768 (SD 1.x) or 1024 (SD 2.x), 77 positions, every position attended."""

    name = "sd"
    label = "SD 1.x / 2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    token_attacks = True
    lora_pipeline = "StableDiffusionPipeline"

    def load_options(self, class_name: str) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_batch(self, pipeline, prompts: list[str]) -> list[EncodedPrompt]:
        """The text encoder's last hidden state (``StableDiffusionPipeline.encode_prompt`` without clip skip)."""
        tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        masked = getattr(encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(encoder.device) if masked else None
        hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        return [EncodedPrompt(hidden[i], int(lengths[i])) for i in range(len(prompts))]

    def text_encoder(self, pipeline) -> nn.Module:
        return pipeline.text_encoder

    def predict_noise(self, pipeline, latents: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        return pipeline.unet(latents, timesteps, encoder_hidden_states=embeds).sample
