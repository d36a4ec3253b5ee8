"""Single-file checkpoints: the toy model as one original-layout file, erased and exported in that layout, read back
by diffusers' own converter (no project import) to the same K/V and images as the diffusers-folder export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rece_lightning import RECEModule, diffusion, testing
from rece_lightning.families.ldm_layout import original_kv_key
from tests.conftest import fit_tiny

ERASE = {"erase_concepts": ["red"], "guide_concepts": " "}

PLAIN_DIFFUSERS = """
import sys, numpy, torch
from diffusers import StableDiffusionPipeline
single, config, out = sys.argv[1:4]
pipe = StableDiffusionPipeline.from_single_file(single, config=config, local_files_only=True, safety_checker=None)
assert "rece_lightning" not in sys.modules
image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np").images
numpy.save(out, image)
from safetensors.torch import save_file
ends = ("attn2.to_k.weight", "attn2.to_v.weight")
kv = {k: v.contiguous() for k, v in pipe.unet.state_dict().items() if k.endswith(ends)}
save_file(kv, out + ".kv.safetensors")
"""


@pytest.fixture(scope="module")
def toy_single_file(toy_model_dir, tmp_path_factory):
    return testing.save_single_file(toy_model_dir, tmp_path_factory.mktemp("single") / "toyworld.safetensors")


def test_the_single_file_writer_is_the_inverse_of_diffusers_converter(toy_single_file, toy_model_dir, toy_pipeline):
    pipeline = diffusion.load_pipeline(str(toy_single_file), single_file_config=str(toy_model_dir))
    for name in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(toy_pipeline, name).state_dict(), getattr(pipeline, name).state_dict()
        assert set(expected) == set(loaded)
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), name


def test_kv_keys_follow_the_original_block_numbering():
    assert original_kv_key("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight", 2) == (
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    )
    assert original_kv_key("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight", 2) == (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    )
    assert original_kv_key("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 2) == (
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    )


@pytest.mark.slow  # two fits and a fresh interpreter: about 12 s
def test_a_single_file_base_is_erased_and_exported_in_its_own_layout(toy_single_file, toy_model_dir, tmp_path):
    _, module = fit_tiny(
        toy_single_file,
        tmp_path / "single",
        max_epochs=1,
        single_file_config=str(toy_model_dir),
        export_dir=str(tmp_path / "single_export"),
        export_format="single_file",
        **ERASE,
    )
    exported = tmp_path / "single_export" / "toyworld_erased.safetensors"
    source, written = load_file(str(toy_single_file)), load_file(str(exported))
    assert set(source) == set(written)
    changed = {k for k in source if not torch.equal(source[k], written[k])}
    kv_keys = {original_kv_key(name, 1) for name in module.kv_state()}
    assert changed == kv_keys  # every tensor but the edited K/V identical
    with safe_open(str(exported), framework="pt") as handle:
        assert "rece_manifest" in handle.metadata()
    assert (tmp_path / "single_export" / "README.md").is_file()

    # the same erasure from the diffusers folder, exported as a pipeline folder
    fit_tiny(
        toy_model_dir,
        tmp_path / "folder",
        max_epochs=1,
        export_dir=str(tmp_path / "folder_export"),
        export_format="diffusers",
        **ERASE,
    )
    out = tmp_path / "single_image.npy"
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS, str(exported), str(toy_model_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder_pipeline = diffusion.load_pipeline(str(tmp_path / "folder_export"))
    for name, value in load_file(str(out) + ".kv.safetensors").items():
        assert torch.equal(value, diffusion.kv_weights(folder_pipeline.unet)[name]), name
    image = folder_pipeline(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np"
    ).images
    assert np.abs(np.load(out) - image).max() < 1e-5


def test_single_file_export_of_a_folder_base_is_refused_before_the_model_loads(toy_model_dir):
    with pytest.raises(
        ValueError, match="export_format='single_file' writes the erased model in the layout of a single"
    ):
        RECEModule(str(toy_model_dir), export_format="single_file")


def test_a_single_file_without_a_config_offline_says_how_to_get_one(toy_single_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"single_file_config=.*huggingface-cli download"):
        RECEModule(str(toy_single_file))


def test_a_config_for_a_folder_base_and_a_missing_file_are_refused(toy_model_dir, tmp_path):
    with pytest.raises(ValueError, match="is no single-file checkpoint"):
        RECEModule(str(toy_model_dir), single_file_config=str(toy_model_dir))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        RECEModule(str(tmp_path / "missing.safetensors"), single_file_config=str(toy_model_dir))
    with pytest.raises(FileNotFoundError, match="single_file_config=.* is not a diffusers pipeline folder"):
        empty = tmp_path / "model.safetensors"
        save_file({"x": torch.zeros(1)}, str(empty))
        RECEModule(str(empty), single_file_config=str(tmp_path))


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_the_evaluator_takes_a_single_file_base(toy_single_file, toy_model_dir, tmp_path):
    import lightning.pytorch as pl

    from rece_lightning.data import PromptDataModule
    from rece_lightning.evaluation import ErasureEvaluator

    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,a red circle,0\n")
    model = ErasureEvaluator(
        str(toy_single_file),
        single_file_config=str(toy_model_dir),
        original_only=True,
        metrics=[],
        num_inference_steps=2,
        output_dir=str(tmp_path / "eval"),
    )
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=PromptDataModule(str(csv), batch_size=1))
    assert model.results["original"]["num_images"] == 1


def test_a_ckpt_single_file_reads_as_its_safetensors_twin(toy_single_file, tmp_path):
    from rece_lightning.single_file import read_single_file

    tensors, _ = read_single_file(toy_single_file)
    ckpt = tmp_path / "toyworld.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    again, _ = read_single_file(ckpt)
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
