"""PixArt-α / PixArt-Σ: a diffusion transformer whose ``attn2`` reads ``caption_projection(T5 embedding)``.

The vectors that feed the K/V are the caption projection's outputs (d = the transformer's width, 1152), not the T5
encoder's (4096), so that is what this family encodes a prompt to; RECE's closed form then applies unchanged.
Generating from such vectors (probes of the derived embedding c', attacks) bypasses the projection for that call.
T5 prompts carry an attention mask: the K/V never read padding, so a prompt's real tokens are its ``length``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from rece_lightning.families.base import EncodedPrompt, ModelFamily

# Token positions of each pipeline's prompts (its ``max_sequence_length`` default): T5's tokenizer says 512.
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


class PixArt(ModelFamily):
    """``PixArtAlphaPipeline`` (120 T5 tokens) and ``PixArtSigmaPipeline`` (300)."""

    name = "pixart"
    label = "PixArt-α / PixArt-Σ"
    pipeline_classes = tuple(MAX_SEQUENCE_LENGTH)
    denoiser_name = "transformer"
    attends_padding = False

    def __init__(self, class_name: str = "PixArtAlphaPipeline") -> None:
        self.class_name = class_name

    def single_file_kv_key(self, kv_name: str, denoiser_config) -> str:
        raise ValueError(
            "PixArt has no single-file checkpoint layout here: export_format=single_file is for SD 1.x/2.x/SDXL"
        )

    def max_length(self, tokenizer) -> int:
        return min(int(tokenizer.model_max_length), MAX_SEQUENCE_LENGTH.get(self.class_name, 120))

    def encoding_modules(self, pipeline) -> dict[str, nn.Module]:
        return {"text_encoder": pipeline.text_encoder, "caption_projection": pipeline.transformer.caption_projection}

    def encode_batch(self, pipeline, prompts: list[str]) -> list[EncodedPrompt]:
        """``encode_prompt`` (T5, no caption cleaning) and the transformer's caption projection."""
        hidden, mask, _, _ = pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=pipeline.text_encoder.device,
            clean_caption=False,
            max_sequence_length=self.max_length(pipeline.tokenizer),
        )
        projection = pipeline.transformer.caption_projection
        projected = projection(hidden.to(pipeline.transformer.dtype))
        lengths = mask.sum(dim=1).tolist()
        return [EncodedPrompt(projected[i], int(lengths[i])) for i in range(len(prompts))]

    def call_options(self, pipeline) -> dict[str, Any]:
        # the evaluation's sizes are its own (resolution binning would change them) and prompts are taken as written
        return {"use_resolution_binning": False, "clean_caption": False}

    def embedding_inputs(
        self, pipeline, embeds: Tensor, pooled: Tensor | None = None, lengths: Sequence[int] | None = None
    ) -> dict[str, Any]:
        transformer = pipeline.transformer
        device, dtype = transformer.device, transformer.dtype
        rows, positions = embeds.shape[0], embeds.shape[1]
        if lengths is None:
            mask = torch.ones(rows, positions, dtype=torch.long, device=device)
        else:
            mask = torch.arange(positions, device=device)[None] < torch.tensor(list(lengths), device=device)[:, None]
            mask = mask.long()
        blank = self.encode(pipeline, [""])[0]  # the pipeline's own negative prompt, projected like the rest
        blank_mask = (torch.arange(positions, device=device) < blank.length).long()
        return {
            "prompt_embeds": embeds.to(device, dtype),
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": blank.embedding[None].expand(rows, -1, -1).to(device, dtype),
            "negative_prompt_attention_mask": blank_mask[None].expand(rows, -1),
            "negative_prompt": None,  # the pipeline refuses a negative prompt beside negative_prompt_embeds
        }

    @contextmanager
    def reading_embeddings(self, pipeline) -> Iterator[None]:
        """The embeddings are caption-projection outputs already: the transformer skips its projection meanwhile."""
        transformer = pipeline.transformer
        projection = transformer.caption_projection
        transformer.caption_projection = None
        try:
            yield
        finally:
            transformer.caption_projection = projection
