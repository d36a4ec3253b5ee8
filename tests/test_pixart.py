"""PixArt-α, a cross-attention DiT, through the family adapter: fit, probes, export, load_erased, an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks import ProbeImages
from callbacks.probing import ProbeSettings, generate_probes
from rece_lightning import RECEModule, diffusion, families, load_erased, testing
from rece_lightning.data import PromptDataModule
from rece_lightning.evaluation import ErasureEvaluator
from rece_lightning.export import WEIGHTS_NAME
from rece_lightning.methods import RECE
from tests.conftest import fit_tiny

PROBE = ProbeSettings(num_images=1, num_inference_steps=2, height=16, width=16)


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory) -> Path:
    return testing.build_tiny_pipeline(tmp_path_factory.mktemp("pixart") / "tiny-pixart", architecture="pixart")


@pytest.fixture(scope="module")
def pixart_fit(pixart_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit-pixart")
    return fit_tiny(pixart_dir, root, max_epochs=2, callbacks=[ProbeImages(probe=PROBE)])


def test_the_kv_read_the_caption_projection_of_t5_and_the_prompt_path_matches_the_embedding_path(pixart_dir):
    pipeline = diffusion.load_pipeline(str(pixart_dir))
    family = families.family_of(pipeline)
    assert json.loads((pixart_dir / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    assert family.name == "pixart" and family.denoiser(pipeline) is pipeline.transformer
    kv = diffusion.kv_weights(pipeline)
    assert len(kv) == 2 * pipeline.transformer.config.num_layers and all(".attn2." in name for name in kv)
    width = pipeline.transformer.config.cross_attention_dim
    assert {tuple(w.shape)[1] for w in kv.values()} == {width}
    encoded = family.encode(pipeline, ["a photo of a cat"])[0]
    hidden, mask, _, _ = pipeline.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
    assert encoded.embedding.shape == (120, width) and encoded.length == int(mask.sum())
    torch.testing.assert_close(encoded.embedding, pipeline.transformer.caption_projection(hidden)[0])
    sampling = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "np"}
    seed = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    from_prompt = family.generate(pipeline, prompts=["a photo of a cat"], generator=seed(), **sampling).images
    from_embeds = family.generate(
        pipeline, embeds=encoded.embedding[None], lengths=[encoded.length], generator=seed(), **sampling
    ).images
    np.testing.assert_allclose(from_prompt, from_embeds, atol=1e-5)
    assert pipeline.transformer.caption_projection is not None  # restored after generating from embeddings


def test_the_uce_edit_maps_the_concept_onto_its_guide_in_the_dit(pixart_dir):
    """RECE's closed form unchanged: after UCE, W_new c ~ W_orig c* on the aligned rows (Eq. 2 with small lambda)."""
    module = RECEModule(str(pixart_dir), erase_concepts=["nudity"], method=RECE(lamb=1e-4), export_dir=None)
    module.attach_pipeline(diffusion.load_pipeline(str(pixart_dir)))
    module.apply_uce()
    concept, guide = module.encoded(["nudity", " "])
    assert guide.length == 1  # T5 reads " " as EOS alone: no BOS
    start = concept.length - 2  # the last word token (no BOS), aligned with the guide's EOS
    edited = module.kv_state()
    errors_before, errors_after = [], []
    for name, original in module.original_kv.items():
        target = original.double() @ guide.embedding[0].double()
        errors_before.append(float((original.double() @ concept.embedding[start].double() - target).norm()))
        errors_after.append(float((edited[name].double() @ concept.embedding[start].double() - target).norm()))
    assert max(errors_after) < 0.05 * min(errors_before)


def test_fit_probes_export_and_load_erased_on_pixart(pixart_fit, pixart_dir):
    trainer, module = pixart_fit
    assert module.rece_epochs_done == 2
    probes = sorted(Path(trainer.log_dir, "probes").rglob("*.png"))
    assert len(probes) == 3 * 2 * PROBE.num_images  # states 0, 1, 2 x {c', prompt}
    images = generate_probes(module, PROBE)
    assert images.derived["nudity"].shape == (1, 16, 16, 3) and np.isfinite(images.derived["nudity"]).all()
    export = Path(trainer.log_dir, "erased")
    assert (export / WEIGHTS_NAME).is_file()
    fresh = load_erased(diffusion.load_pipeline(str(pixart_dir)), export)
    for name, weight in diffusion.kv_weights(fresh).items():
        assert torch.equal(weight, module.kv_state()[name])
        assert not torch.equal(weight, module.original_kv[name])


def test_a_one_prompt_evaluation_of_the_erased_pixart(pixart_fit, pixart_dir, tmp_path):
    import lightning.pytorch as pl

    trainer, _ = pixart_fit
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance\na photo of a cat,3,4.5\n")
    output = tmp_path / "eval"
    evaluator = ErasureEvaluator(
        str(pixart_dir),
        erased=str(Path(trainer.log_dir, "erased")),
        metrics=["nudity"],
        scheduler="model",
        num_inference_steps=2,
        height=16,
        width=16,
        dtype="float32",
        output_dir=str(output),
    )
    tester = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    tester.test(evaluator, datamodule=PromptDataModule(str(csv)))
    results = json.loads((output / "results.json").read_text())["results"]
    for variant in ("original", "erased"):
        assert (results[variant]["num_prompts"], results[variant]["num_images"]) == (1, 1)
    original = sorted((output / "original").rglob("*.png"))
    erased = sorted((output / "erased").rglob("*.png"))
    assert len(original) == len(erased) == 1
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(original[0])), np.asarray(Image.open(erased[0])))
