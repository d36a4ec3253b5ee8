"""The toy text-to-image model: Stable Diffusion's architecture at a size that trains on two CPU cores.

``AutoencoderKL`` (32 px RGB -> 8 x 8 x 4 latents), a 2-layer causal ``CLIPTextModel`` of width 128 (frozen at its
random initialisation while the U-Net trains, as SD's CLIP is: ``training.LatentDiffusionTraining``), a word-level
tokenizer with CLIP's special tokens, a
``UNet2DConditionModel`` with cross-attention at both resolutions and in the middle block, and DDPM / DDIM schedulers
with Stable Diffusion's beta schedule. Saved with ``save_pretrained``, it loads with
``StableDiffusionPipeline.from_pretrained(folder)`` like any SD checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rece_lightning.testing import name_tokenizer_class
from rece_lightning.toyworld.world import vocabulary

TEXT_WIDTH = 128
# Captions are at most 15 tokens; 16 positions (SD has 77) keep the text width well above the rows one edit touches
# (d / T = 8 here, about 10 in SD 1.x), so erasing one word leaves room for the others, and halve the training time.
MAX_TOKENS = 16
# Default sampling of the toy model (its model card and the configs use these): DDIM, 20 steps, guidance 5, 32 px.
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 5.0
RESOLUTION = 32
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
EMBEDDING_SCALE = 0.1  # per-coordinate std of the fixed position vectors
# Per-coordinate std of the (frozen) token vectors: three times the positions', so that a word's identity reaches the
# rows after it through the random encoder (cosine of the rows of 'a red circle' and 'a crimson circle': 0.54-0.96,
# against 0.93-0.97 at 0.1, where a prompt's rows are nearly one vector).
TOKEN_EMBEDDING_SCALE = 0.3
# Words no caption uses but configs and tests do (the artists' guide "art", a concept of another world)
EXTRA_WORDS = "with painting art style nudity"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


@dataclass
class ToyComponents:
    """The parts of a toy Stable Diffusion pipeline, before or after training."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module


def build_tokenizer():
    """A word-level tokenizer of the toy world's words (``tokenizers``' ``WordLevel``), CLIP's special tokens and
    padding: BOS, the words, EOS, then EOS padding to ``MAX_TOKENS``. A word outside the world is ``<|unk|>``, a token
    of its own, so that a prompt the model cannot read is refused (``tokens.unknown_words``, checked by
    ``RECEModule.setup``) instead of being encoded as something else."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, UNK]
    words = sorted({*vocabulary(), *EXTRA_WORDS.split()})
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, *words])}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_TOKENS,
    )


def build_components(seed: int = 0, text_width: int = TEXT_WIDTH) -> ToyComponents:
    """Freshly initialised components; ``text_width``: the text encoder's width d, which the K/V read (the shipped
    model's 128, or wider: README, "Beyond RECE")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Token and position vectors larger than CLIP's 0.02 (the encoder stays random: training.LatentDiffusionTraining).
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
    with torch.no_grad():
        embeddings.position_embedding.weight.normal_(0.0, EMBEDDING_SCALE)
        embeddings.token_embedding.weight.normal_(0.0, TOKEN_EMBEDDING_SCALE)
    embeddings.position_embedding.requires_grad_(False)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=2,  # heads (diffusers' SD naming): 2 heads of 32 run 20 % faster on CPU than 8 of 8
        norm_num_groups=32,
    )
    return ToyComponents(tokenizer, text_encoder, vae, unet)


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**BETAS)


def sampling_scheduler():
    """DDIM with ``clip_sample=False``: clipping latents to [-1, 1] smears the shapes (shared/NOTES.md)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_pipeline(components: ToyComponents, folder: str | Path) -> Path:
    """Write the trained parts as a standard diffusers ``StableDiffusionPipeline`` folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    name_tokenizer_class(Path(folder), TOKENIZER_CLASS)
    return Path(folder)
