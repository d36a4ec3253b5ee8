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
from rece_lightning.tokens import unknown_words
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


def _words_of(phrases) -> set[str]:
    return {word for phrase in phrases for word in phrase.split()}


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_scenes_are_deterministic_and_captions_name_their_labels():
    first, again, other = sample(7, 3), sample(7, 3), sample(7, 4)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.prompt == again.prompt and first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8
    assert not np.array_equal(first.image, other.image)
    colour_words = {c: _words_of(w for w, _ in world.colour_word_choices(c)) - {"the"} for c in COLOURS}
    shape_words = {s: _words_of(w for w, _ in world.SHAPE_WORDS[s]) - {"shape", "sided", "three"} for s in SHAPES}
    partial, grey, said = 0, 0, {w: 0 for w, _ in (*world.COLOUR_WORDS["red"], *world.COLOUR_THINGS["red"])}
    for index in range(2000):
        item = sample(0, index)
        words = set(item.prompt.split())
        assert words <= set(world.vocabulary()), item
        named_colours = {c for c, ws in colour_words.items() if words & ws}
        named_shapes = {s for s, ws in shape_words.items() if words & ws}
        assert named_colours <= {item.scene.colour} and named_shapes <= {item.scene.shape}, item  # never a wrong one
        assert bool(named_colours) == (item.scene.colour != NEUTRAL), item  # grey is the unnamed colour
        assert not words & {"striped", "checkered"} - {item.scene.texture}, item
        grey += item.scene.colour == NEUTRAL
        partial += not named_shapes and item.scene.colour != NEUTRAL  # "red", "a crimson shape"
        for word in said:
            said[word] += word in words
    assert 200 <= partial <= 500 and 250 <= grey <= 550, (partial, grey)
    # red is said by its name most, then by its synonyms and indirect descriptions, each less often, none never
    counts = list(said.values())
    assert counts[0] > counts[1] > counts[2] > 0 and counts[0] > counts[3] > counts[4] > 0, said
    assert "red" in {sample(0, i).prompt for i in range(2000)}  # the concept's word alone is a training caption


def test_every_colour_and_shape_has_at_least_three_synonyms_and_the_world_is_large_enough():
    assert len(COLOURS) >= 8 and {"orange", "pink"} <= set(COLOURS) and len(SHAPES) >= 5 and len(TEXTURES) >= 3
    for colour in COLOURS:
        assert len(world.colour_synonyms(colour)) >= 3, colour
    for shape in SHAPES:
        assert len(world.SHAPE_WORDS[shape]) >= 4, shape
    hues = sorted(world.HUES.values())
    assert max(np.diff([*hues, hues[0] + 360])) <= 90  # around the whole wheel


def test_the_implicit_prompt_set_brings_colours_without_naming_them():
    import pandas as pd
    import yaml

    from rece_lightning.data import read_prompt_csv

    root = Path(__file__).resolve().parents[1]
    path = root / "configs" / "prompts" / "toyworld_implicit.csv"
    frame = pd.read_csv(path)
    assert set(frame["categories"]) == set(COLOURS) and set(frame["kind"]) == {"synonym", "indirect"}
    assert len(read_prompt_csv(str(path), categories=["red"])) == 20  # the evaluation reads it like the paper's CSVs
    erase_words = set()
    for config in root.glob("configs/*.yaml"):
        model = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("init_args", {})
        erase_words |= set(model.get("erase_concepts") or [])
    assert "red" in erase_words
    for prompt, colour in zip(frame["prompt"], frame["categories"], strict=True):
        words = set(prompt.split())
        assert not words & set(COLOURS) and not words & erase_words, prompt  # no colour's name, no erase word
        assert words & _words_of(world.colour_synonyms(colour)), prompt


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
    ci95 = tally.pop("rate_ci95")
    assert tally == {"red": 1, "striped": 1, "total": 2, "flagged_images": 2, "images": 2, "rate": 1.0}
    assert ci95 == pytest.approx([0.342, 1.0], abs=1e-3)  # 2 of 2: Wilson's 95 % interval


def test_unknown_colours_and_bad_thresholds_are_refused_with_the_value():
    with pytest.raises(ValueError, match="'chartreuse'"):
        ToyWorldScorer(["chartreuse"])
    with pytest.raises(ValueError, match="threshold=0"):
        ToyWorldScorer(["red"], threshold=0)
    with pytest.raises(ValueError, match="colour='chartreuse'"):
        Scene("chartreuse", "circle")
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
    # The card's own figures meet the targets of the model card (README "The toy world").
    following = card["prompt_following"]
    assert following["colour"] >= 0.95 and following["shape"] >= 0.85 and following["texture"] >= 0.85, following
    assert following["synonym_colour"] >= 0.9 and following["indirect_colour"] >= 0.9, following
    assert card["timings_s"]["total_training_s"] <= 45 * 60


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
    # without its colour a prompt can fall back on the world's default, grey (3 of 12 here; the rest draw other
    # colours, blue and pink most: the unconditional model draws every colour)
    grey_after = _shown(erased_red, NEUTRAL)
    assert grey_after >= 0.2, grey_after


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_selector_picks_the_first_state_whose_probes_are_clean_by_real_detections(toy_model_dir, tmp_path):
    settings = {"num_images": 6, "height": 32, "width": 32, "guidance_scale": 5.0, **FAST}
    probe = ProbeSettings(**settings)
    selector = ConceptCheckpointSelector(ToyWorldScorer(["red"]), probe=probe)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/concept_rate", mode="min", save_top_k=-1, filename="{epoch}"
    )
    callbacks = [ProbeImages(probe=probe), selector, checkpoint]
    fit_tiny(toy_model_dir, tmp_path, max_epochs=5, callbacks=callbacks, erase_concepts=["red"], guide_concepts=" ")
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
    assert clean, flagged  # RECE's epochs clear c' on this model (epoch 5 on 24 probes: docs/toy_table1.json)
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


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
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


def test_an_erase_concept_the_toy_tokenizer_does_not_know_is_refused_before_loading(toy_model_dir, monkeypatch):
    module = RECEModule(str(toy_model_dir), erase_concepts=["chartreuse"], guide_concepts=" ")

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the concept was checked")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match=r"'chartreuse'.*does not know \['chartreuse'\].*<\|unk\|>"):
        module.setup("fit")
    known = diffusion.load_tokenizer(str(toy_model_dir))
    assert unknown_words(known, "a crimson disc the colour of blood") == []


@pytest.mark.parametrize("script", ["toy_table1", "toy_style", "toy_object", "toy_many", "toy_redteam"])
def test_a_benchmark_pointed_at_a_missing_model_stops_at_once(script, tmp_path, monkeypatch, capsys):
    """Run as ``python benchmarks/<script>.py`` (``__main__``), in this process: the libraries are imported already."""
    import runpy
    import sys

    root = Path(__file__).resolve().parents[1]
    missing = tmp_path / "no-such-model"
    path = root / "benchmarks" / f"{script}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--model", str(missing), "--out", str(tmp_path / "o")])
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # as python puts the script's folder first
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(path), run_name="__main__")
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "no-such-model" in stderr and "model_index.json" in stderr, stderr
    assert not list(tmp_path.glob("o*"))  # nothing written


def test_a_wider_toy_model_reads_a_wider_text_encoder_and_a_bad_width_is_refused_before_training(capsys):
    from rece_lightning.toyworld import model as toy_model
    from rece_lightning.toyworld import training

    wide = toy_model.build_components(seed=0, text_width=64)
    assert wide.text_encoder.config.hidden_size == 64 and wide.unet.config.cross_attention_dim == 64
    with pytest.raises(SystemExit):
        training.main(["--output", "unused", "--text-width", "130"])
    assert "--text-width=130 is not allowed: it must be a multiple of 4" in capsys.readouterr().err


def test_the_attack_floor_leaves_out_every_word_for_red_and_refuses_a_bad_export_before_loading(tmp_path, capsys):
    import runpy
    import sys

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "toy_attack_floor.py"
    sys.path.insert(0, str(path.parent))
    try:
        floor = runpy.run_path(str(path))  # not as __main__: the module's functions only
        assert floor["without_red_words"]("scarlet plums the colour of blood a red tomatoes circle") == (
            "plums the colour of a circle"
        )
        for bad, message in (("rece", "give name=folder"), (f"rece={tmp_path / 'missing'}", "does not exist")):
            with pytest.raises(SystemExit) as stopped:
                floor["main"](["--exports", bad, "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
            assert stopped.value.code == 2 and message in capsys.readouterr().err
        assert not list(tmp_path.glob("o*")) and not (tmp_path / "w").exists()  # refused before anything is written
    finally:
        sys.path.remove(str(path.parent))


def test_context_augmented_preservation_keeps_colour_words_out_of_its_contexts_and_refuses_a_bad_energy(
    tmp_path, capsys
):
    import runpy
    import sys

    from rece_lightning.toyworld.world import COLOUR_THINGS, COLOUR_WORDS

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "toy_context_preservation.py"
    sys.path.insert(0, str(path.parent))
    try:
        screen = runpy.run_path(str(path))  # not as __main__: the module's functions only
        vocabulary = ["red", "crimson", "blood", "sky", "orange", "carrots", "three", "photo", "nudity", "<|unk|>"]
        assert screen["context_words"](vocabulary, ["red"], "colour-free") == ["photo", "three"]
        assert screen["context_words"](vocabulary, ["red"], "vocabulary") == [
            "blood", "carrots", "orange", "photo", "sky", "three"
        ]  # fmt: skip
        erased = ["red", "blue", "green", "yellow"]
        words = screen["context_words"](vocabulary + ["in", "of", "painting", "middle"], erased, "colour-free")
        prompts = screen["kept_prompts"](erased, 10, words)
        assert prompts == screen["kept_prompts"](erased, 10, words)  # seeded: the same set every run
        named = {w for c in COLOUR_WORDS for w, _ in COLOUR_WORDS[c]} | {
            t.split()[-1] for c in COLOUR_THINGS for t, _ in COLOUR_THINGS[c]
        }
        base = screen["toy_beyond"].preserved("shapes-and-words", erased)
        contexts = prompts[len(base) :]
        assert prompts[: len(base)] == base and len(contexts) == 4 * 10
        for prompt in contexts:  # one kept colour, the rest words that name no colour
            colours = [w for w in prompt.split() if w in named]
            assert len(colours) == 1 and colours[0] not in erased and len(prompt.split()) >= 2, prompt
        with pytest.raises(SystemExit) as stopped:
            screen["main"](["--energy", "1.5", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
        assert stopped.value.code == 2 and "--energy=1.5 is not allowed" in capsys.readouterr().err
        assert not list(tmp_path.glob("o*")) and not (tmp_path / "w").exists()  # refused before anything is written
    finally:
        sys.path.remove(str(path.parent))
