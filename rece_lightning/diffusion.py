"""The diffusers adapter: the only module that knows Stable Diffusion's layout and layer names.

It finds the pipeline class of a model folder from its ``model_index.json`` (SD 1.x / 2.x: ``StableDiffusionPipeline``;
SDXL: ``StableDiffusionXLPipeline``; SD3 and Flux are refused), loads it (hub id or local folder), finds the
cross-attention K/V projections by what they are (``Attention.is_cross_attention``), reads and writes their weights,
encodes prompts exactly as the pipeline does (SDXL: both text encoders concatenated, d = 2048, plus the pooled
embedding), selects tokens the way the reference code does, and builds tiny random SD-1.x-, SD-2.x- and SDXL-shaped
pipelines for offline tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

TokenMode = Literal["last_word_onward", "all"]
TOKEN_MODES: tuple[str, ...] = ("last_word_onward", "all")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config string ("float32", "float16", "bfloat16") to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not allowed: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is ``org/name``; anything absolute, relative-looking or deeper is meant as a local folder."""
    return (
        os.path.exists(name_or_path)
        or os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") != 1
    )


# The pipeline classes whose U-Net reads the text through cross-attention K/V: what RECE's closed form edits.
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "SD 1.x / 2.x",
    "StableDiffusionXLPipeline": "SDXL",
}
# Families whose transformer attends jointly over text and image tokens (MM-DiT): no cross-attention K/V reads a
# text embedding, which is what RECE's closed form edits; refused with that reason.
_JOINT_ATTENTION = ("StableDiffusion3", "Flux", "SD3", "AuraFlow", "QwenImage")
# Diffusion transformers whose attn2 is a real cross-attention over the (projected) text embedding: RECE applies to
# them, but their text encoders (T5, Gemma, mT5 + CLIP) and projections need a model-family adapter first.
_CROSS_ATTENTION_DIT = ("PixArt", "Sana", "HunyuanDiT", "Lumina")


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


def check_pipeline_class(class_name: str, name_or_path: str) -> str:
    """Refuse a pipeline class RECE cannot edit, saying why; return the supported class name."""
    if class_name in SUPPORTED_PIPELINES:
        return class_name
    supported = ", ".join(f"{name} ({family})" for name, family in SUPPORTED_PIPELINES.items())
    if any(family.lower() in class_name.lower() for family in _CROSS_ATTENTION_DIT):
        raise ValueError(
            f"{name_or_path!r} is a {class_name}, which is not supported yet: its transformer's attn2 is a "
            "cross-attention over the projected text embedding, so RECE's closed form applies, but encoding its "
            "prompts (its own text encoder and caption projection) needs a model-family adapter this version lacks; "
            f"supported: {supported}"
        )
    if any(family.lower() in class_name.lower() for family in _JOINT_ATTENTION):
        raise ValueError(
            f"{name_or_path!r} is a {class_name}: a transformer with joint (MM-DiT) attention over text and image "
            "tokens, which has no cross-attention key/value projections reading the text embedding. RECE and UCE "
            f"edit exactly those (attn2.to_k / attn2.to_v), so this model is not supported; supported: {supported}"
        )
    raise ValueError(
        f"{name_or_path!r} is a {class_name!r}, which is not supported: give a text-to-image pipeline of "
        + " or ".join(f"{name} ({family})" for name, family in SUPPORTED_PIPELINES.items())
    )


def pipeline_class_name(name_or_path: str) -> str | None:
    """The supported pipeline class named by the folder's ``model_index.json`` (None if it cannot be read here)."""
    index = model_index(name_or_path)
    if index is None:
        return None
    return check_pipeline_class(str(index.get("_class_name")), name_or_path)


def is_sdxl(pipeline) -> bool:
    """Whether ``pipeline`` conditions on two text encoders and a pooled embedding (SDXL)."""
    return getattr(pipeline, "text_encoder_2", None) is not None


def check_pretrained_path(name_or_path: str) -> str | None:
    """Refuse a local folder that is not a saved diffusers pipeline, or a pipeline class RECE cannot edit, before
    anything heavy is loaded; return the pipeline class (None where ``model_index.json`` cannot be read here)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"pretrained_model_name_or_path={name_or_path!r} is not allowed: give a hub id such as "
            "'CompVis/stable-diffusion-v1-4' or a local folder written by save_pretrained"
        )
    if looks_like_local_path(name_or_path) and not (Path(name_or_path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(
            f"pretrained_model_name_or_path={name_or_path!r} is not a diffusers pipeline folder (no model_index.json "
            "there); give a folder written by save_pretrained or a hub id such as 'CompVis/stable-diffusion-v1-4'"
        )
    return pipeline_class_name(name_or_path)


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


def load_tokenizer(name_or_path: str):
    """The pipeline's tokenizer alone: cheap, so prompts can be checked before the models load."""
    from transformers import AutoTokenizer

    check_downloadable(name_or_path)
    return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path), subfolder="tokenizer")


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """``from_pretrained`` of the pipeline class the folder's ``model_index.json`` names (SD 1.x/2.x or SDXL), without
    the safety checker (it would blank the probe images) or SDXL's invisible watermark (it would alter them)."""
    import diffusers

    check_downloadable(name_or_path)
    class_name = pipeline_class_name(name_or_path) or "DiffusionPipeline"
    extra = (
        {"add_watermarker": False}
        if class_name == "StableDiffusionXLPipeline"
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    pipeline = getattr(diffusers, class_name).from_pretrained(os.path.expanduser(name_or_path), dtype=dtype, **extra)
    check_pipeline_class(type(pipeline).__name__, name_or_path)  # a hub id whose index was not cached
    pipeline.set_progress_bar_config(disable=True)
    for component in _networks(pipeline):
        component.requires_grad_(False)
        component.eval()
    if device is not None:
        pipeline.to(device)
    return pipeline


def _networks(pipeline) -> list[nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None]


def default_image_size(pipeline) -> int:
    """The pipeline's own image side: 512 for SD 1.x, 768 for SD 2.x (768-v), 1024 for SDXL."""
    return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)


# --- cross-attention K/V -------------------------------------------------------------------------------------------


def cross_attention_kv(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every cross-attention key/value projection of ``unet``, by parameter-name prefix, in module order.

    SD 1.x has 16 cross-attention layers, so 32 entries (``...attn2.to_k`` and ``...attn2.to_v``).
    """
    from diffusers.models.attention_processor import Attention

    projections: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            projections[f"{name}.to_k"] = module.to_k
            projections[f"{name}.to_v"] = module.to_v
    if not projections:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers: RECE edits only those")
    return projections


def kv_weights(unet: nn.Module) -> dict[str, Tensor]:
    """The K/V weight tensors themselves (not copies), keyed like ``unet.state_dict()``."""
    return {f"{name}.weight": linear.weight for name, linear in cross_attention_kv(unet).items()}


def looks_like_kv_name(name: str) -> bool:
    """Whether ``name`` can be a key of :func:`kv_weights` (checked before any U-Net is loaded)."""
    return name.endswith((".to_k.weight", ".to_v.weight"))


@torch.no_grad()
def write_kv_weights(unet: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` into the U-Net's K/V projections in place; names and shapes must match exactly."""
    current = kv_weights(unet)
    check_kv_compatible(current, weights)
    for name, value in weights.items():
        current[name].copy_(value.to(device=current[name].device, dtype=current[name].dtype))


def check_kv_compatible(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str = "weights") -> None:
    """Refuse K/V weights from another base model: the layer count, names and shapes must match."""
    if len(expected) != len(given):
        raise ValueError(
            f"{what} hold {len(given)} K/V matrices but this U-Net has {len(expected)} cross-attention K/V "
            "projections: they were made for another base model"
        )
    for name, value in given.items():
        if name not in expected:
            raise ValueError(f"{what} name {name!r}, which this U-Net does not have: made for another base model")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(value.shape)} but this U-Net's is {tuple(expected[name].shape)}: "
                "made for another base model"
            )


def unet_weights_file(name_or_path: str | os.PathLike) -> Path | None:
    """The single U-Net safetensors file of a diffusers pipeline folder (or of its ``unet`` folder); None if there is
    no such file here (a hub id not in the cache, a sharded or variant-named U-Net)."""
    folder = Path(os.path.expanduser(str(name_or_path)))
    if looks_like_local_path(str(name_or_path)):
        for unet_folder in (folder / "unet", folder):
            candidates = sorted(unet_folder.glob("diffusion_pytorch_model*.safetensors"))
            if len(candidates) == 1 and (unet_folder / "config.json").is_file():
                return candidates[0]
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "diffusion_pytorch_model.safetensors", subfolder="unet")
    except Exception:  # noqa: BLE001  (no cache, odd id: callers fall back to loading the model)
        return None
    return Path(cached) if isinstance(cached, str) else None


def _is_cross_attention_kv(name: str) -> bool:
    return looks_like_kv_name(name) and ".attn2." in name  # diffusers names cross-attention attn2 in every SD U-Net


def base_kv_shapes(name_or_path: str) -> dict[str, tuple[int, ...]] | None:
    """The base model's K/V shapes read from its U-Net safetensors header, without loading it (a local folder or a
    hub id already in the Hugging Face cache); None where the file cannot be found without a download."""
    from safetensors import safe_open

    path = unet_weights_file(name_or_path)
    if path is None:
        return None
    with safe_open(str(path), framework="pt") as handle:
        return {
            name: tuple(handle.get_slice(name).get_shape())
            for name in handle.keys()  # noqa: SIM118  (safe_open has keys(), not iteration)
            if _is_cross_attention_kv(name)
        }


def read_unet_kv(path: Path) -> dict[str, Tensor]:
    """Only the cross-attention K/V weights of a U-Net safetensors file (another method's edited model)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if _is_cross_attention_kv(name)}  # noqa: SIM118


def check_kv_fit_before_loading(name_or_path: str, weights: Mapping[str, Tensor], what: str = "weights") -> None:
    """Refuse K/V weights that do not fit the base model's U-Net, from its file header, before any model loads."""
    shapes = base_kv_shapes(name_or_path)
    if shapes is None:
        return
    expected = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    check_kv_compatible(expected, weights, what=f"{what} (base model {name_or_path!r})")


# --- prompts and tokens --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's text-encoder output over all positions and the number of real tokens (BOS and EOS included).

    ``pooled``: SDXL's pooled text embedding (the second encoder's projection), which conditions the U-Net through its
    time embedding, not through cross-attention; None for SD 1.x / 2.x.
    """

    embedding: Tensor  # (max_length, d)
    length: int
    pooled: Tensor | None = None


def token_count(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` including BOS and EOS, without truncation."""
    return len(tokenizer(text, truncation=False).input_ids)


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` reads as its unknown token (a word-level tokenizer's words outside
    its vocabulary, such as the toy model's); always empty for CLIP's byte-level BPE, which has no unknown token
    apart from EOS."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}:
        return []
    return [word for word in text.split() if unk in tokenizer(word, add_special_tokens=False).input_ids]


ENCODE_BATCH = 64  # prompts per text-encoder call: thousands of concepts encode in batches, not all at once


@torch.no_grad()
def encode_prompts(pipeline, prompts: Sequence[str], batch_size: int = ENCODE_BATCH) -> list[EncodedPrompt]:
    """Encode ``prompts`` in batches, padded to the tokenizer's 77 positions, as the pipeline itself would.

    SD 1.x / 2.x: the text encoder's last hidden state (``StableDiffusionPipeline.encode_prompt`` without clip skip).
    SDXL: ``StableDiffusionXLPipeline.encode_prompt`` itself: both encoders' penultimate layers concatenated (d = 2048
    for SDXL base) and the pooled embedding.
    """
    prompts = list(prompts)
    tokenizer = pipeline.tokenizer
    encoded: list[EncodedPrompt] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        tokens = tokenizer(
            chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        if is_sdxl(pipeline):
            hidden, _, pooled, _ = pipeline.encode_prompt(
                chunk, device=pipeline.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        else:
            encoder = pipeline.text_encoder
            mask = (
                tokens.attention_mask.to(encoder.device)
                if getattr(encoder.config, "use_attention_mask", False)
                else None
            )
            hidden, pooled = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0], None
        encoded += [
            EncodedPrompt(hidden[i], int(lengths[i]), None if pooled is None else pooled[i]) for i in range(len(chunk))
        ]
    return encoded


def embedding_inputs(pipeline, prompt_embeds: Tensor, pooled: Tensor | None = None) -> dict[str, Tensor]:
    """Keyword arguments that make ``pipeline(...)`` generate from embeddings instead of prompts.

    SDXL also needs a pooled embedding per row; RECE's probes pass the concept's own (the text encoders are never
    edited, so whatever regenerates the concept through K/V arrives with that pooled vector; see the README).
    """
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    inputs = {"prompt_embeds": prompt_embeds.to(device, dtype)}
    if is_sdxl(pipeline):
        if pooled is None:
            raise ValueError("an SDXL pipeline needs a pooled text embedding with prompt_embeds; none was given")
        inputs["pooled_prompt_embeds"] = pooled.to(device, dtype)
    return inputs


def select_tokens(
    source: Tensor, source_length: int, target: Tensor, target_length: int, mode: TokenMode
) -> tuple[Tensor, Tensor]:
    """Row-aligned (source, destination) embedding rows for one erase pair.

    ``"all"``: every position of both (RECE's epochs in the reference code). ``"last_word_onward"``: UCE's initial
    edit, from each prompt's last word token to the end, the longer prompt's tail cut so both slices have the same
    length ("nudity" is ``nu`` + ``dity``, so its slice starts at ``dity``; " " starts at BOS).
    """
    if mode == "all":
        return source, target
    if mode != "last_word_onward":
        raise ValueError(f"token mode {mode!r} is not allowed: choose one of {TOKEN_MODES}")
    total = source.shape[0]
    source_start = source_length - 2
    target_start = target_length - 2
    farthest = max(source_start, target_start)
    return (
        source[source_start : total - (farthest - source_start)],
        target[target_start : total - (farthest - target_start)],
    )


# --- a tiny random pipeline for offline tests -----------------------------------------------------------------------

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


TINY_ARCHITECTURES: tuple[str, ...] = ("sd1", "sd2", "sdxl")


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

    Every one has a tiny VAE and a DDIM scheduler, and no safety checker. ``tokenizer`` is a folder holding the real
    CLIP tokenizer (``vocab.json`` + ``merges.txt``); without it a small BPE is trained on the fly.

    ``max_length`` (token positions, 77 as in SD) and ``text_width`` (``sd1`` / ``sd2``: the text encoder's width,
    d) shape the closed form's inputs: with ``text_width > max_length`` the edits take the thin rank-T branches that
    Stable Diffusion (d = 768-2048, 77 rows) takes, instead of the dense ones the default shapes take.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not allowed: choose one of {list(TINY_ARCHITECTURES)}")
    folder = Path(folder)
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
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
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
