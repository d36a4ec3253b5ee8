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


# --- single-file checkpoints -----------------------------------------------------------------------------------------

_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_module_in_original_layout(module: str, layers_per_block: int, up_attention: Sequence[bool]) -> str:
    """One U-Net module path in the original (LDM) layout, for any block count and ``layers_per_block``."""
    import re

    per = layers_per_block + 1
    if module in _UNET_FIXED:
        return _UNET_FIXED[module]
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.?(.*)", module):
        side, block, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        index = per * block + layer + 1 if side == "down" else per * block + layer
        head = f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}"
        if kind == "resnets":
            rest = dict(_RESNET_NAMES).get(rest, rest)
        return f"{head}.{rest}" if rest else head
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{per * (int(match[1]) + 1)}.0.op"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", module):
        block = int(match[1])
        return f"output_blocks.{per * block + layers_per_block}.{2 if up_attention[block] else 1}.{match[2]}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(match[1])}.{dict(_RESNET_NAMES).get(match[2], match[2])}"
    raise KeyError(f"no original-layout name for U-Net module {module!r}")


def _vae_key_in_original_layout(key: str, blocks: int) -> str:
    import re

    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.",
        key,
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.", key
    )
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in (
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ):
            key = key.replace(old, new)
    return key


def save_single_file(pipeline_folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write an SD 1.x-style diffusers pipeline folder (U-Net, VAE, CLIP text encoder) as one ``.safetensors`` in the
    original Stable Diffusion layout, as A1111 / civitai checkpoints are: the single-file input the tests load back
    through diffusers' own converter (``from_single_file(path, config=pipeline_folder)``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(pipeline_folder).expanduser()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    up_attention = [name.startswith("CrossAttn") for name in unet.config.up_block_types]
    state: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        name = _unet_module_in_original_layout(module, unet.config.layers_per_block, up_attention)
        state[f"model.diffusion_model.{name}.{parameter}"] = value
    blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = _vae_key_in_original_layout(key, blocks)
        if name.startswith("mid.attn_1.") and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # the original VAE's attention projections are 1x1 convolutions
        state[f"first_stage_model.{name}"] = value
    for key, value in text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --- image classifiers -----------------------------------------------------------------------------------------------


def build_tiny_classifier(folder: str | os.PathLike, labels: Sequence[str], favour: str | None = None) -> Path:
    """A tiny random ResNet image classifier with ImageNet-style ``labels`` (``id2label``) and its image processor,
    saved like ``microsoft/resnet-50`` is; ``favour``: the label it predicts for every image (a large output bias), so
    that tests see non-zero accuracies."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = ResNetForImageClassification(config).eval()
    if favour is not None:
        with torch.no_grad():
            model.classifier[-1].bias[list(labels).index(favour)] += 100.0
    folder = Path(folder)
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(folder)
    return folder
