"""Testing aids that ship with the package (as ``diffusers.utils.testing_utils`` and ``lightning.pytorch.demos`` do):
tiny random pipelines of every supported family, saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path as a real model, and the small tokenizers they use offline.

``TinyPipeline`` is a model source for configs: ``pretrained_model_name_or_path: {class_path:
rece_lightning.testing.TinyPipeline, init_args: {folder: runs/smoke/tiny-sd}}`` builds the folder on first use
(``configs/smoke.yaml``). Production classes take a path or such a source, never a test flag.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rece_lightning.diffusion import ModelSource
from rece_lightning.validation import check_choice

# --- tokenizers ------------------------------------------------------------------------------------------------------

_TINY_CORPUS = (
    "a photo of a cat sitting on a sofa",
    "an oil painting of a starry night over a quiet town",
    "portrait of a woman in the style of van gogh",
    "a landscape with mountains and a river at sunset",
    "nudity naked nude body art painting drawing sketch",
    "a dog running on the beach, highly detailed, 8k",
    "pablo picasso rembrandt andy warhol caravaggio kelly mckernan thomas kinkade",
    "a red car parked in front of a house",
    "church gas pump garbage truck parachute golf ball french horn",
)


def train_small_bpe(folder: Path, corpus: Sequence[str] = _TINY_CORPUS, vocab_size: int = 600) -> None:
    """A small BPE in CLIP's file format (``</w>`` word ends, ``#version`` header), loadable by ``CLIPTokenizer``.

    Its ids are not CLIP's; words of ``corpus`` become single tokens while ``vocab_size`` allows.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789,.'!?-:;()&"),
    )
    bpe.train_from_iterator(list(corpus) * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    # CLIPTokenizer also needs every single character as a word end.
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.'!?-:;()&":
        vocab.setdefault(f"{char}</w>", len(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))


def train_small_t5_tokenizer(corpus: Sequence[str] = _TINY_CORPUS, vocab_size: int = 400, max_length: int = 120):
    """A small T5-style tokenizer (``tokenizers`` BPE over SentencePiece's ``▁`` word starts; ``<pad>`` = 0,
    ``</s>`` = 1 appended to every prompt, ``<unk>`` = 2; no BOS), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789,.'!?-:;()&▁"),
    )
    backend.train_from_iterator(list(corpus) * 4, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def name_tokenizer_class(folder: Path, class_name: str = "PreTrainedTokenizerFast") -> None:
    """Record a ``tokenizers``-backed tokenizer under ``class_name`` in a saved pipeline: transformers 5 names its class
    ``TokenizersBackend``, the same class transformers 4 knows as ``PreTrainedTokenizerFast``."""
    for path, key in (
        (folder / "model_index.json", "tokenizer"),
        (folder / "tokenizer" / "tokenizer_config.json", "tokenizer_class"),
    ):
        config = json.loads(path.read_text())
        config[key] = ["transformers", class_name] if key == "tokenizer" else class_name
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- tiny pipelines ---------------------------------------------------------------------------------------------------

TINY_ARCHITECTURES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "pixart")


def build_tiny_pipeline(
    folder: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    architecture: str = "sd1",
    max_length: int = 77,
    text_width: int | None = None,
) -> Path:
    """Write a random tiny pipeline to ``folder`` with ``save_pretrained`` and return the folder.

    ``architecture``:

    * ``"sd1"``: U-Net with cross-attention at two resolutions (7 cross-attention layers, 14 K/V matrices), 2-layer
      CLIP text encoder of width 32, epsilon prediction.
    * ``"sd2"``: SD 2.x's differences: linear projections in the transformer blocks, per-block head sizes, a GELU
      (OpenCLIP-style) text encoder of width 48, v-prediction.
    * ``"sdxl"``: SDXL's: two text encoders (widths 32 + 32, concatenated to d = 64; the second with a projection that
      gives the pooled embedding), ``text_time`` added conditioning, cross-attention in the inner block only, with two
      transformer layers (8 cross-attention layers, 16 K/V matrices).

    * ``"pixart"``: a PixArt-α DiT (:func:`build_tiny_pixart`).

    Every one has a tiny VAE and a DDIM scheduler, and no safety checker. ``tokenizer`` is a folder holding the real
    CLIP tokenizer (``vocab.json`` + ``merges.txt``); without it a small BPE is trained on the fly.

    ``max_length`` (token positions, 77 as in SD) and ``text_width`` (``sd1`` / ``sd2``: the text encoder's width,
    d) shape the closed form's inputs: with ``text_width > max_length`` the edits take the thin rank-T branches that
    Stable Diffusion (d = 768-2048, 77 rows) takes, instead of the dense ones the default shapes take.
    """
    import diffusers
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_choice("architecture", architecture, TINY_ARCHITECTURES)
    folder = Path(folder)
    if architecture == "pixart":
        return build_tiny_pixart(folder, seed=seed)
    tokenizer_folder = folder / "_tokenizer_source"
    if tokenizer is None:
        train_small_bpe(tokenizer_folder)
        tokenizer = tokenizer_folder
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer), model_max_length=max_length)
    torch.manual_seed(seed)

    def text_config(width: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=max(len(clip_tokenizer), 1000),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
            **extra,
        )

    unet_shape = {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 32,
    }
    if architecture == "sdxl":
        unet = UNet2DConditionModel(
            **unet_shape,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + the pooled embedding's 32
            cross_attention_dim=64,
        )
        encoders = {
            "text_encoder": CLIPTextModel(text_config(32, hidden_act="gelu")),
            "text_encoder_2": CLIPTextModelWithProjection(text_config(32, hidden_act="gelu", projection_dim=32)),
            "tokenizer_2": clip_tokenizer,
        }
    else:
        sd2 = architecture == "sd2"
        width = text_width or (48 if sd2 else 32)
        unet = UNet2DConditionModel(
            **unet_shape,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
        )
        encoders = {"text_encoder": CLIPTextModel(text_config(width, hidden_act="gelu" if sd2 else "quick_gelu"))}
    vae = _tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if architecture == "sd2" else "epsilon",
    )
    if architecture == "sdxl":
        pipeline = diffusers.StableDiffusionXLPipeline(
            unet=unet, vae=vae, tokenizer=clip_tokenizer, scheduler=scheduler, add_watermarker=False, **encoders
        )
    else:
        pipeline = diffusers.StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            tokenizer=clip_tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **encoders,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    if tokenizer_folder.exists():
        for file in tokenizer_folder.iterdir():
            file.unlink()
        tokenizer_folder.rmdir()
    return folder


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def build_tiny_pixart(folder: str | os.PathLike, seed: int = 0, max_length: int = 120) -> Path:
    """A random tiny ``PixArtAlphaPipeline`` in ``folder``: a 2-block ``PixArtTransformer2DModel`` of width 24 (3 heads
    of 8, patch 2, adaLN-single), whose ``attn2`` reads ``caption_projection`` of a 2-layer ``T5EncoderModel`` of width
    32, the small T5-style tokenizer of :func:`train_small_t5_tokenizer` (``max_length`` positions, 120 as PixArt-α),
    the tiny VAE and a DDIM scheduler."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = train_small_t5_tokenizer(max_length=max_length)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False
    )
    pipeline = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(), transformer=transformer, scheduler=scheduler
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    name_tokenizer_class(folder)
    return folder


class TinyPipeline(ModelSource):
    """A tiny random pipeline as a model source: its ``folder``, built on first use if it holds no pipeline yet.

    Args:
        folder: where the pipeline is (or will be) saved.
        architecture: ``sd1``, ``sd2``, ``sdxl`` or ``pixart`` (:func:`build_tiny_pipeline`).
        tokenizer: folder of the real CLIP tokenizer (``vocab.json`` + ``merges.txt``) for the SD shapes; absent or
            ``null``: a small BPE trained on the fly.
    """

    def __init__(self, folder: str, architecture: str = "sd1", tokenizer: str | None = None) -> None:
        self.folder = str(folder)
        self.architecture = check_choice("architecture", architecture, TINY_ARCHITECTURES)
        if Path(self.folder).expanduser().is_file():
            raise NotADirectoryError(f"folder={self.folder!r} is a file: TinyPipeline writes a pipeline folder there")
        self.tokenizer = tokenizer

    @property
    def name_or_path(self) -> str:
        return self.folder

    def make(self) -> None:
        folder = Path(self.folder).expanduser()
        if not (folder / "model_index.json").is_file():
            tokenizer = self.tokenizer
            if tokenizer is not None and not Path(tokenizer, "vocab.json").is_file():
                tokenizer = None  # a small BPE is trained instead
            build_tiny_pipeline(folder, tokenizer=tokenizer, architecture=self.architecture)

    def __repr__(self) -> str:
        return f"TinyPipeline({self.folder!r}, architecture={self.architecture!r})"
