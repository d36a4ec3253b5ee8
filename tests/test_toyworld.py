"""The toy world: its renders and detectors, the shipped model trained on it, and RECE seen working on that model."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks import ConceptCheckpointSelector, ProbeImages, ProbeSettings
from rece_lightning import RECEModule, diffusion, load_erased
from rece_lightning.data import PromptDataModule
from rece_lightning.evaluation import ErasureEvaluator
from rece_lightning.toyworld import (
    COLOURS,
    NEUTRAL,
    OBJECT_COLOURS,
    SHAPES,
    TEXTURES,
    Scene,
    ToyWorldScorer,
    predict,
    render,
    sample,
    world,
)
from rece_lightning.toyworld.measure import accuracy, combination_prompts, generate
from tests.conftest import fit_tiny

FAST = {"num_inference_steps": 10}  # the toy model's default is 20; 10 DDIM steps already draw clean shapes


# --- the world and its detectors ----------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_captions_name_their_labels():
    first, again, other = sample(7, 3), sample(7, 3), sample(7, 4)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.prompt == again.prompt and first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
    assert not np.array_equal(first.image, other.image)
    partial, grey = 0, 0
    for index in range(200):
        item = sample(0, index)
        words = set(item.prompt.split())
        named = words & {*COLOURS, *SHAPES, "striped"}
        assert named <= set(item.scene.labels.values()) and named, item  # never names a wrong attribute
        assert bool(words & set(COLOURS)) == (item.scene.colour != NEUTRAL), item  # grey is the unnamed colour
        grey += item.scene.colour == NEUTRAL
        partial += len(named) == 1 and item.scene.colour != NEUTRAL  # "red", "a red shape"
        if len(named) > 1:
            assert item.scene.shape in words
            assert ("striped" in words) == (item.scene.texture == "striped")
    assert 15 <= partial <= 60 and 30 <= grey <= 75
    assert {w for p in world.all_prompts() for w in p.split()} == set(world.vocabulary())
    assert "red" in world.all_prompts()  # the concept's word alone is a training caption


def test_detectors_label_held_out_renders_with_at_least_98_percent_accuracy():
    held_out = [sample(12345, index) for index in range(600)]  # the training scenes use world seed 0
    predictions = [predict(item.image) for item in held_out]
    for attribute in ("colour", "shape", "texture"):
        hits = np.mean(
            [getattr(p, attribute) == item.scene.labels[attribute] for p, item in zip(predictions, held_out)]
        )
        assert hits >= 0.98, (attribute, hits)


def test_every_colour_shape_and_texture_is_recognised_on_a_plain_render():
    for colour in OBJECT_COLOURS:
        for shape in SHAPES:
            for texture in TEXTURES:
                prediction = predict(render(Scene(colour, shape, texture, half_size=10.0)))
                assert (prediction.colour, prediction.shape, prediction.texture) == (colour, shape, texture)


def test_a_grey_object_is_grey_whatever_its_edge_pixels_say():
    image = render(Scene(NEUTRAL, "circle", half_size=10.0))
    image[16, 6:9] = (215, 35, 35)  # a few red pixels, as a sampler's artefacts leave on an object's edge
    assert predict(image).colour == NEUTRAL
    assert ToyWorldScorer(["red", NEUTRAL]).detect([image]) == [{NEUTRAL: 1.0}]
    red = render(Scene("red", "circle", half_size=10.0))
    assert set(ToyWorldScorer(["red", NEUTRAL]).detect([red])[0]) == {"red"}


def test_an_empty_image_shows_nothing():
    blank = np.full((32, 32, 3), 240, dtype=np.uint8)
    assert predict(blank).colour is None
    assert ToyWorldScorer(["red", "circle"]).detect([blank]) == [{}]


def test_scorer_interface_matches_the_nudenet_scorer():
    red, blue = render(Scene("red", "circle")), render(Scene("blue", "square", "striped"))
    scorer = ToyWorldScorer(["red", "striped"])
    found = scorer.detect([red, blue.astype(np.float32) / 255.0])  # uint8 and float images alike
    assert set(found[0]) == {"red"} and found[0]["red"] > 0.9
    assert found[1] == {"striped": 1.0}
    tally = scorer.tally(found)
    assert tally == {"red": 1, "striped": 1, "total": 2, "flagged_images": 2, "images": 2, "rate": 1.0}


def test_unknown_colours_and_bad_thresholds_are_refused_with_the_value():
    with pytest.raises(ValueError, match="'purple'"):
        ToyWorldScorer(["purple"])
    with pytest.raises(ValueError, match="threshold=0"):
        ToyWorldScorer(["red"], threshold=0)
    with pytest.raises(ValueError, match="colour='purple'"):
        Scene("purple", "circle")
    with pytest.raises(ValueError, match="shape='hexagon'"):
        sample(0, 0, shape="hexagon")


def test_a_detector_that_does_not_fit_the_selector_is_refused_before_any_generation():
    with pytest.raises(TypeError, match="lacks"):
        ConceptCheckpointSelector(scorer=object())


# --- the shipped model -------------------------------------------------------------------------------------------


def test_shipped_model_is_a_plain_diffusers_pipeline_under_15_mb(toy_model_dir):
    from diffusers import StableDiffusionPipeline  # no project code involved in loading

    size = sum(f.stat().st_size for f in toy_model_dir.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, size
    pipeline = StableDiffusionPipeline.from_pretrained(
        toy_model_dir, safety_checker=None, requires_safety_checker=False
    )
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    card = json.loads((toy_model_dir / "toyworld.json").read_text())
    # The card's own figures meet the targets (colour >= 0.95, shape >= 0.85; this model measures 1.0 and 0.983).
    assert card["prompt_following"]["colour"] >= 0.95 and card["prompt_following"]["shape"] >= 0.85, card
    assert card["timings_s"]["total_training_s"] <= 30 * 60


def test_shipped_model_draws_what_it_is_asked(toy_pipeline):
    rows = combination_prompts(textures=("plain",), images_per_combination=1)
    images = generate(toy_pipeline, [p for p, _ in rows], list(range(len(rows))), **FAST)
    scores = accuracy(images, [labels for _, labels in rows])
    assert scores["colour"] >= 0.9 and scores["shape"] >= 0.75, scores


@pytest.fixture
def fresh_toy_pipeline(toy_pipeline):
    """The session's toy pipeline, with its original K/V restored after the test."""
    original = {n: w.detach().clone() for n, w in diffusion.kv_weights(toy_pipeline.unet).items()}
    yield toy_pipeline
    diffusion.write_kv_weights(toy_pipeline.unet, original)


def _images(pipeline, colour: str, seeds: range) -> np.ndarray:
    prompts = [p for p, _ in combination_prompts(colours=[colour], images_per_combination=2)][: len(seeds)]
    return generate(pipeline, prompts, list(seeds)[: len(prompts)], **FAST)


def _shown(images: np.ndarray, colour: str) -> float:
    scorer = ToyWorldScorer([colour])
    return scorer.tally(scorer.detect(images))["rate"]


def _rate(pipeline, colour: str, seeds: range) -> float:
    return _shown(_images(pipeline, colour, seeds), colour)


def test_erasing_one_colour_lowers_its_rate_and_keeps_another(toy_model_dir, fresh_toy_pipeline):
    seeds = range(12)
    red_before, blue_before = _rate(fresh_toy_pipeline, "red", seeds), _rate(fresh_toy_pipeline, "blue", seeds)
    module = RECEModule(str(toy_model_dir), erase_concepts=["red"], guide_concepts=" ")
    module.attach_pipeline(fresh_toy_pipeline)
    module.erase(epochs=0)  # the UCE edit; later epochs are measured by benchmarks/toy_report.py
    erased_red = _images(fresh_toy_pipeline, "red", seeds)
    red_after, blue_after = _shown(erased_red, "red"), _rate(fresh_toy_pipeline, "blue", seeds)
    assert red_before >= 0.9, red_before  # the concept is really there before erasure
    assert red_after <= 0.1, red_after
    assert blue_after >= 0.9 * blue_before and blue_before >= 0.9, (blue_before, blue_after)
    # without its colour the prompt falls back on the world's default, grey (7 of 12 here; the blank prompt draws
    # grey in 17 % of images, docs/toy_null_embedding.json)
    grey_after = _shown(erased_red, NEUTRAL)
    assert grey_after >= 0.35, grey_after


def test_selector_picks_the_first_state_whose_probes_are_clean_by_real_detections(toy_model_dir, tmp_path):
    settings = {"num_images": 6, "height": 32, "width": 32, "guidance_scale": 5.0, **FAST}
    probe = ProbeSettings(**settings)
    selector = ConceptCheckpointSelector(ToyWorldScorer(["red"]), probe=probe)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/concept_rate", mode="min", save_top_k=-1, filename="{epoch}"
    )
    callbacks = [ProbeImages(probe=probe), selector, checkpoint]
    fit_tiny(toy_model_dir, tmp_path, max_epochs=3, callbacks=callbacks, erase_concepts=["red"], guide_concepts=" ")
    flagged = [s["probe_flagged"] for s in selector.scores]
    assert flagged[0] > 0, flagged  # after UCE alone, c' still draws red (the paper's point): not a vacuous check
    direct = ToyWorldScorer(["red"])  # the selector's counts are the detector's on the probe PNGs
    for state, count in enumerate(flagged):
        pngs = sorted((tmp_path / "rece/version_0/probes" / f"state_{state:02d}").glob("red_derived_*.png"))
        assert (
            direct.tally(direct.detect([np.asarray(Image.open(p).convert("RGB")) for p in pngs]))["flagged_images"]
            == count
        )
    clean = [state for state, count in enumerate(flagged) if count == 0]
    assert clean, flagged  # RECE's epochs clear c' on this model (epoch 3 on 24 probes in docs/toy_report.json)
    first_clean = clean[0]
    selection = json.loads((tmp_path / "rece" / "version_0" / "selected" / "selection.json").read_text())
    assert selector.selected == first_clean and "['red']" in selection["reason"]
    assert selection["state"] == first_clean
    if first_clean > 0:  # state k is the model after epoch k-1: ModelCheckpoint's epoch=(k-1).ckpt
        pipeline_a = load_erased(diffusion.load_pipeline(str(toy_model_dir)), tmp_path / "rece/version_0/selected")
        pipeline_b = load_erased(
            diffusion.load_pipeline(str(toy_model_dir)), tmp_path / f"ckpt/epoch={first_clean - 1}.ckpt"
        )
        for name, weight in diffusion.kv_weights(pipeline_b.unet).items():
            assert torch.equal(diffusion.kv_weights(pipeline_a.unet)[name], weight)


def test_evaluator_concept_counts_match_a_direct_count(toy_model_dir, tmp_path):
    trainer, module = fit_tiny(
        toy_model_dir, tmp_path / "fit", max_epochs=1, erase_concepts=["red"], guide_concepts=" "
    )
    export = module.export(tmp_path / "erased")
    prompts = [p for p, _ in combination_prompts(colours=["red", "blue"], images_per_combination=1)]
    csv = tmp_path / "prompts.csv"
    colours = ["red" if "red" in p else "blue" for p in prompts]
    csv.write_text(
        "prompt,evaluation_seed,case_number,categories\n"
        + "".join(f"{p},{i},{i},{c}\n" for i, (p, c) in enumerate(zip(prompts, colours, strict=True)))
    )
    scorer = ToyWorldScorer(["red", "blue"])
    evaluator = ErasureEvaluator(
        str(toy_model_dir),
        erased=str(export),
        metrics=["concept"],
        scorer=scorer,
        output_dir=str(tmp_path / "eval"),
        scheduler="model",
        num_inference_steps=10,
        height=32,
        width=32,
        dtype="float32",
    )
    data = PromptDataModule(str(csv), batch_size=6, default_guidance=5.0)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).test(evaluator, datamodule=data)
    report = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    for variant in ("original", "erased"):
        figures = report[variant]["concept"]
        folder = Path(report[variant]["image_dir"])
        paths = sorted(folder.glob("*.png"), key=lambda p: int(p.name.split("_")[0]))  # in case (prompt) order
        found = scorer.detect([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        assert report[variant]["num_images"] == len(prompts) == len(found)
        assert figures["red"] == sum("red" in f for f in found) and figures["blue"] == sum("blue" in f for f in found)
        # the rate is the erased concept's (the export erased "red"), not "any class the scorer knows"
        assert figures["erased_classes"] == ["red"]
        assert figures["rate"] == figures["red"] / len(found)
        blue = [f for f, c in zip(found, colours, strict=True) if c == "blue"]
        assert (
            figures["preserved"] == figures["preserved_per_class"]["blue"] == sum("blue" in f for f in blue) / len(blue)
        )
    assert report["original"]["concept"]["red"] >= 5  # 6 red prompts: the detector really fires
    assert report["erased"]["concept"]["red"] < report["original"]["concept"]["red"]
    assert report["original"]["concept"]["preserved"] >= 0.8 and report["erased"]["concept"]["preserved"] >= 0.8
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "red rate %" in table and "Others kept %" in table


def test_concept_metric_without_a_scorer_is_refused(toy_model_dir):
    with pytest.raises(ValueError, match="scorer=None"):
        ErasureEvaluator(str(toy_model_dir), metrics=["concept"])


def test_toy_training_is_a_real_lightning_run_that_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from rece_lightning.toyworld.training import train_toy_model

    card = train_toy_model(
        tmp_path / "toy",
        num_scenes=64,
        vae_steps=2,
        unet_steps=2,
        batch_size=16,
        log_dir=tmp_path / "logs",
        measure_images=0,
    )
    assert card["unet_steps"] == 2 and card["vae_scaling_factor"] > 0
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "toy", safety_checker=None)
    assert pipeline.vae.config.scaling_factor == pytest.approx(card["vae_scaling_factor"])
    losses = list((tmp_path / "logs" / "unet").rglob("events.out.tfevents.*"))
    assert losses, "the U-Net run logged nothing"
    assert Path(tmp_path / "toy" / "toyworld.json").is_file()


@pytest.mark.slow  # end to end
def test_toy_config_is_the_offline_main_command(toy_model_dir, tmp_path, monkeypatch):
    from train import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            f"--model.pretrained_model_name_or_path={toy_model_dir}",
            "--trainer.max_epochs=2",
        ]
    )
    assert cli.model.rece_epochs_done == 2
    selection = json.loads(next(tmp_path.glob("runs/toy/red/version_*/selected/selection.json")).read_text())
    assert [s["state"] for s in selection["scores"]] == [0, 1, 2]
    assert list(tmp_path.glob("runs/toy/red/version_*/probes/state_02/red_derived_0.png"))
    assert (tmp_path / "runs/toy/erased/rece_kv.safetensors").is_file()


def test_a_toy_config_pointed_at_a_missing_model_folder_stops_before_loading(tmp_path):
    from train import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        (FileNotFoundError, ValueError), match="no-such-model.*no model_index.json"
    ):  # jsonargparse wraps it
        cli_main(["--config", str(config), f"--model.pretrained_model_name_or_path={missing}"], run=False)
