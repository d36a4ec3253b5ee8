"""The diffusers adapter on a tiny random pipeline saved with save_pretrained and loaded with from_pretrained."""

from __future__ import annotations

import pytest
import torch

from rece_lightning import diffusion, families, testing
from rece_lightning.tokens import select_tokens
from tests.conftest import clip_tokenizer_or_skip


def test_tiny_pipeline_loads_through_from_pretrained_with_cross_attention_at_two_resolutions(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    assert pipeline.safety_checker is None
    projections = diffusion.cross_attention_kv(pipeline.unet)
    assert len(projections) % 2 == 0 and len(projections) >= 4
    assert all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in projections)
    widths = {linear.weight.shape[0] for linear in projections.values()}
    assert len(widths) >= 2  # two resolutions: 32 and 64 channels
    assert {linear.weight.shape[1] for linear in projections.values()} == {pipeline.text_encoder.config.hidden_size}
    # K/V names are the U-Net's own parameter names, so exports line up with unet.state_dict().
    assert set(diffusion.kv_weights(pipeline.unet)) <= set(pipeline.unet.state_dict())


def test_finds_layers_by_type_not_by_name():
    """An SD-1.x-shaped U-Net (down 0-2 x2, mid x1, up 1-3 x3) has 16 cross-attention layers -> 32 matrices."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    assert len(diffusion.cross_attention_kv(unet)) == 32


def test_write_kv_weights_round_trips_and_refuses_foreign_shapes(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    weights = {name: torch.full_like(w, 0.5) for name, w in diffusion.kv_weights(pipeline.unet).items()}
    diffusion.write_kv_weights(pipeline.unet, weights)
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in diffusion.kv_weights(pipeline.unet).values())
    name = next(iter(weights))
    with pytest.raises(ValueError, match="shape"):
        diffusion.write_kv_weights(pipeline.unet, {**weights, name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="K/V matrices"):
        diffusion.write_kv_weights(pipeline.unet, dict(list(weights.items())[:2]))


def test_last_word_onward_matches_the_reference_slicing_with_the_real_clip_tokenizer(tiny_pipeline_dir):
    clip_tokenizer_or_skip()
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    nudity, empty = families.encode_prompts(pipeline, ["nudity", " "])
    assert (nudity.length, empty.length) == (4, 2)  # BOS, "nu", "dity", EOS / BOS, EOS
    source, target = select_tokens(nudity.embedding, nudity.length, empty.embedding, empty.length, "last_word_onward")
    # Slice starts at "dity" (index 2) for the concept and at BOS (index 0) for " ", both 75 rows long.
    assert source.shape[0] == target.shape[0] == 75
    assert torch.equal(source, nudity.embedding[2:])
    assert torch.equal(target, empty.embedding[:75])
    source, target = select_tokens(nudity.embedding, 4, empty.embedding, 2, "all")
    assert source.shape[0] == target.shape[0] == 77
    with pytest.raises(ValueError, match="'first'"):
        select_tokens(nudity.embedding, 4, empty.embedding, 2, "first")


def test_empty_and_blank_prompts_tokenize_alike(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    blank, empty = families.encode_prompts(pipeline, [" ", ""])
    assert blank.length == empty.length == 2
    torch.testing.assert_close(blank.embedding, empty.embedding)


def test_fallback_bpe_tokenizer_builds_a_working_pipeline(tmp_path):
    folder = testing.build_tiny_pipeline(tmp_path / "bpe-sd")
    pipeline = diffusion.load_pipeline(str(folder))
    ids = pipeline.tokenizer("a painting of nudity").input_ids
    assert ids[0] == pipeline.tokenizer.bos_token_id and ids[-1] == pipeline.tokenizer.eos_token_id
    assert pipeline.tokenizer.unk_token_id not in ids[1:-1]
    assert pipeline.tokenizer.model_max_length == 77
    images = pipeline(
        "a cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.manual_seed(0)
    ).images
    assert images.shape == (1, 32, 32, 3)


def test_missing_local_folder_is_refused_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        diffusion.check_pretrained_path(str(tmp_path / "no-such-model"))
    diffusion.check_pretrained_path("CompVis/stable-diffusion-v1-4")  # a hub id is left to from_pretrained
    with pytest.raises(ValueError, match="float8"):
        diffusion.resolve_dtype("float8")
