"""Export after fit, then load into a freshly loaded pipeline: same K/V, same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rece_lightning import diffusion, load_erased, testing
from rece_lightning.export import MANIFEST_NAME, WEIGHTS_NAME, read_manifest
from tests.conftest import fit_tiny


def _images(pipeline):
    generator = torch.Generator().manual_seed(1234)
    return pipeline(
        ["nudity", "a photo of a cat"],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=generator,
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def fitted(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    import lightning.pytorch as pl

    trainer, module = fit_tiny(
        tiny_pipeline_dir, root, max_epochs=2, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt")]
    )
    return trainer, module, root


def test_fit_exports_only_the_kv_weights_with_a_manifest(fitted, tiny_pipeline_dir):
    trainer, module, _ = fitted
    folder = trainer.log_dir + "/erased"
    weights = load_file(f"{folder}/{WEIGHTS_NAME}")
    assert set(weights) == set(module.kv_state())
    manifest = read_manifest(folder)
    assert manifest["base_model"] == str(tiny_pipeline_dir)
    assert manifest["erase_concepts"] == ["nudity"] and manifest["guide_concepts"] == [" "]
    assert manifest["hyperparameters"] == {
        "lamb": 0.1,
        "erase_scale": 1.0,
        "preserve_scale": 0.1,
        "reg": 0.1,
        "uce_lamb": None,
        "uce_preserve_scale": None,
    }
    assert manifest["token_modes"] == {"uce": "last_word_onward", "rece": "all"}
    assert manifest["rece_epochs"] == 2 and manifest["num_kv_matrices"] == len(weights)
    assert {"torch", "diffusers", "lightning"} <= set(manifest["versions"])


def test_export_applied_to_a_fresh_pipeline_gives_identical_weights_and_images(fitted, tiny_pipeline_dir):
    trainer, module, _ = fitted
    fresh = diffusion.load_pipeline(str(tiny_pipeline_dir))
    before = _images(fresh)
    load_erased(fresh, trainer.log_dir + "/erased")
    for name, weight in module.kv_state().items():
        assert torch.equal(diffusion.kv_weights(fresh.unet)[name], weight)
    after = _images(fresh)
    assert not (before == after).all()
    assert (after == _images(module.pipeline)).all()


def test_lightning_checkpoint_loads_like_the_export(fitted, tiny_pipeline_dir):
    _, module, root = fitted
    checkpoint = next((root / "ckpt").glob("*.ckpt"))
    fresh = load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), checkpoint)
    for name, weight in module.kv_state().items():
        assert torch.equal(diffusion.kv_weights(fresh.unet)[name], weight)


def test_mismatched_base_model_is_refused_and_leaves_the_pipeline_untouched(fitted, tiny_pipeline_dir, tmp_path):
    trainer, _, _ = fitted
    weights = load_file(trainer.log_dir + "/erased/" + WEIGHTS_NAME)
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    untouched = {n: w.clone() for n, w in diffusion.kv_weights(pipeline.unet).items()}

    fewer = dict(list(weights.items())[:-2])
    save_file(fewer, str(tmp_path / "fewer.safetensors"))
    with pytest.raises(ValueError, match=f"hold {len(fewer)} K/V matrices but this model has {len(weights)}"):
        load_erased(pipeline, tmp_path / "fewer.safetensors")

    wider = {n: torch.zeros(w.shape[0], w.shape[1] * 24) for n, w in weights.items()}  # a 768-wide base model
    save_file(wider, str(tmp_path / "wider.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_erased(pipeline, tmp_path / "wider.safetensors")
    for name, weight in diffusion.kv_weights(pipeline.unet).items():
        assert torch.equal(weight, untouched[name])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_erased(pipeline, tmp_path / "missing")


def test_manifest_is_json_next_to_the_weights(fitted):
    trainer, _, _ = fitted
    text = trainer.log_dir + "/erased/" + MANIFEST_NAME
    assert json.loads(open(text).read())["method"] == "RECE"


def test_exports_get_the_usual_file_permissions(tmp_path):
    import os
    import stat

    from rece_lightning.export import save_erased

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    save_erased(tmp_path / "export", {"down.attn2.to_k.weight": torch.ones(2, 2)}, {"base_model": "x"})
    for name in (WEIGHTS_NAME, MANIFEST_NAME):
        assert stat.S_IMODE((tmp_path / "export" / name).stat().st_mode) == expected, name


def test_a_non_finite_corrupt_or_foreign_file_is_refused_by_name(fitted, tiny_pipeline_dir, tmp_path):
    from rece_lightning.evaluation import ErasureEvaluator
    from rece_lightning.export import read_erased

    trainer, _, root = fitted
    weights = load_file(trainer.log_dir + "/erased/" + WEIGHTS_NAME)
    poisoned = dict(weights)
    name = next(iter(poisoned))
    poisoned[name] = poisoned[name].clone()
    poisoned[name][0, 0] = float("nan")
    save_file(poisoned, str(tmp_path / "nan.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    save_file({"text_model.embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    checkpoint = next((root / "ckpt").glob("*.ckpt"))
    nan_checkpoint = torch.load(checkpoint, weights_only=False)
    nan_checkpoint["state_dict"]["transform"][0, 0] = float("inf")
    torch.save(nan_checkpoint, tmp_path / "nan.ckpt")
    cases = {
        "nan.safetensors": "NaN or inf",
        "corrupt.safetensors": "not a readable safetensors file",
        "foreign.safetensors": "not a RECE export",
        "notes.ckpt": "neither a RECE export",
        "other.ckpt": "not a RECEModule checkpoint",
        "nan.ckpt": "NaN or inf",
    }
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    untouched = {n: w.clone() for n, w in diffusion.kv_weights(pipeline.unet).items()}
    for file, message in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            read_erased(tmp_path / file)
        assert file in str(caught.value)
        with pytest.raises(ValueError, match=message):
            load_erased(pipeline, tmp_path / file)
        with pytest.raises(ValueError, match=message):  # before any model loads
            ErasureEvaluator(str(tiny_pipeline_dir), erased=str(tmp_path / file))
    for name, weight in diffusion.kv_weights(pipeline.unet).items():
        assert torch.equal(weight, untouched[name])


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    """Another base model of exactly the tiny pipeline's shapes (another seed): SD 1.5 to its SD 1.4."""
    from tests.conftest import CLIP_TOKENIZER

    tokenizer = CLIP_TOKENIZER if (CLIP_TOKENIZER / "vocab.json").is_file() else None
    return testing.build_tiny_pipeline(tmp_path_factory.mktemp("other") / "other-sd", tokenizer=tokenizer, seed=1)


def test_an_edit_is_refused_on_another_base_of_the_same_shapes_and_twice_on_one(fitted, other_base_dir, tmp_path):
    trainer, module, root = fitted
    export = Path(trainer.log_dir) / "erased"
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    assert manifest["base_kv_identity"] == module.base_identity and manifest["erased_kv_identity"]
    checkpoint = next((root / "ckpt").glob("*.ckpt"))
    other = diffusion.load_pipeline(str(other_base_dir))
    untouched = {n: w.clone() for n, w in diffusion.kv_weights(other.unet).items()}
    for path in (export, checkpoint):
        with pytest.raises(ValueError, match="was made from other base weights .* allow_other_base=True"):
            load_erased(other, path)
    for name, weight in diffusion.kv_weights(other.unet).items():
        assert torch.equal(weight, untouched[name])
    with pytest.warns(UserWarning, match="applying it anyway"):
        load_erased(other, export, allow_other_base=True)  # on purpose
    # twice on the base it was made from: the second application is refused (a checkpoint's transform would compound)
    pipeline = load_erased(diffusion.load_pipeline(str(module.hparams.pretrained_model_name_or_path)), export)
    with pytest.raises(ValueError, match="already holds that edit"):
        load_erased(pipeline, export)
    with pytest.raises(ValueError, match="other base weights"):
        load_erased(pipeline, checkpoint)


def test_the_base_identity_does_not_depend_on_the_dtype_it_was_loaded_in(tiny_pipeline_dir):
    from rece_lightning.export import kv_identity

    full = diffusion.kv_weights(diffusion.load_pipeline(str(tiny_pipeline_dir)).unet)
    half = diffusion.kv_weights(diffusion.load_pipeline(str(tiny_pipeline_dir), dtype=torch.float16).unet)
    assert kv_identity(full) == kv_identity(half)
    moved = {**full, next(iter(full)): next(iter(full.values())) + 1e-2}
    assert kv_identity(moved) != kv_identity(full)
