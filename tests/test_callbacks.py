"""Callbacks on real fits of the tiny pipeline, read back from TensorBoard; NudeNet for real and scripted."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import CollapseGuard, NudityCheckpointSelector, ParameterDrift, ProbeImages
from callbacks.probing import ProbeSettings, generate_probes
from rece_lightning import diffusion, load_erased
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, NudityScorer, to_bgr_uint8
from rece_lightning.evaluation.statistics import wilson_interval
from tests.conftest import fit_tiny

TINY = {"num_images": 2, "num_inference_steps": 2, "height": 32, "width": 32}
PROBE = ProbeSettings(**TINY)  # one probe-settings object for every callback: images made once per state


class ScriptedDetector:
    """Stands in for NudeNet: no tiny random model generates nudity, so the selection rule is tested with a detector
    that reports an exposed breast while the module has applied fewer than ``clean_from`` RECE rounds."""

    def __init__(self, clean_from: int | None) -> None:
        self.clean_from = clean_from
        self.module = None
        self.calls = 0

    def detect(self, image):
        assert image.dtype == np.uint8 and image.shape[-1] == 3  # NudeNet's BGR uint8 convention
        self.calls += 1
        if self.clean_from is not None and self.module.rece_epochs_done >= self.clean_from:
            return []
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}]


class ShowModule(pl.Callback):
    """Lets the scripted detector see the module's state (first in the callback list, so it runs first)."""

    def __init__(self, detector: ScriptedDetector) -> None:
        self.detector = detector

    def on_fit_start(self, trainer, pl_module):  # also runs for max_epochs=0, whose training loop never starts
        self.detector.module = pl_module


def _events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def full_run(tiny_pipeline_dir, tmp_path_factory):
    """2 epochs with all four callbacks and a ModelCheckpoint on val/nudity_rate; the scripted detector is clean
    from state 1 on, so state 1 (after one RECE epoch) must be selected."""
    root = tmp_path_factory.mktemp("callbacks")
    detector = ScriptedDetector(clean_from=1)
    callbacks = [
        ProbeImages(probe=PROBE),
        ParameterDrift(),
        NudityCheckpointSelector(detector=detector, probe=PROBE),
        CollapseGuard(probe=PROBE),
        pl.callbacks.ModelCheckpoint(
            dirpath=root / "ckpt", monitor="val/nudity_rate", mode="min", save_top_k=-1, filename="{epoch}"
        ),
    ]
    trainer, module = fit_tiny(tiny_pipeline_dir, root, max_epochs=2, callbacks=[ShowModule(detector), *callbacks])
    return trainer, module, root, callbacks


def test_tensorboard_has_one_probe_image_per_concept_and_state_and_drift_for_every_epoch(full_run):
    trainer, _, _, _ = full_run
    events = _events(trainer.log_dir)
    for kind in ("derived", "prompt"):
        images = events.Images(f"probe/nudity/{kind}")
        assert [image.step for image in images] == [0, 1, 2]  # after UCE, after epoch 0, after epoch 1
        assert images[0].width == 2 * 32 and images[0].height == 32  # one row of num_images probes
    for tag in ("drift/k_total", "drift/v_total", "drift/total", "drift/update_norm", "drift/preservation"):
        assert [s.step for s in events.Scalars(tag)] == [0, 1, 2], tag
    assert [s.step for s in events.Scalars("drift/derived_norm/nudity")] == [0, 1, 2]
    assert any(tag.startswith("drift_layer/k/") for tag in events.Tags()["scalars"])
    assert {"drift/k_per_layer", "drift/v_per_layer"} <= set(events.Tags()["histograms"])
    totals = [s.value for s in events.Scalars("drift/total")]
    assert all(v > 0 for v in totals) and totals[1] > totals[0]  # each epoch moves K/V further from the original
    assert [s.value for s in events.Scalars("collapse/detected")] == [0.0, 0.0, 0.0]


def _independent_drift(current: dict, original: dict) -> dict[str, float]:
    """||W - W_orig||_F / ||W_orig||_F over all K, all V, all matrices and per layer, in numpy float64."""
    sums = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
    per_layer = {}
    for name, base in original.items():
        base = base.double().cpu().numpy()
        delta = current[name].double().cpu().numpy() - base
        kind = "k" if name.endswith("to_k.weight") else "v"
        sums[kind][0] += float(np.sum(delta**2))
        sums[kind][1] += float(np.sum(base**2))
        per_layer[f"drift_layer/{kind}/{name.split('.transformer_blocks')[0]}"] = np.sqrt(
            np.sum(delta**2) / np.sum(base**2)
        )
    figures = {f"drift/{kind}_total": np.sqrt(num / den) for kind, (num, den) in sums.items()}
    figures["drift/total"] = np.sqrt((sums["k"][0] + sums["v"][0]) / (sums["k"][1] + sums["v"][1]))
    return {**figures, **per_layer}


def test_logged_drift_matches_an_independent_computation_at_every_state(full_run):
    trainer, module, root, _ = full_run
    events = _events(trainer.log_dir)
    # state 2 (the end) from the module, state 1 from the checkpoint written after epoch 0 (W = W_orig @ transform)
    states = {2: module.kv_state()}
    checkpoint = torch.load(root / "ckpt" / "epoch=0.ckpt", weights_only=False)
    states[1] = module.weights_for(checkpoint["state_dict"]["transform"].to(torch.float64))
    for step, weights in states.items():
        expected = _independent_drift(weights, module.original_kv)
        assert len(expected) > 3
        for tag, value in expected.items():
            logged = next(s.value for s in events.Scalars(tag) if s.step == step)
            assert logged == pytest.approx(value, rel=1e-5), (tag, step)
        collapse = next(s.value for s in events.Scalars("collapse/kv_drift") if s.step == step)
        assert collapse == pytest.approx(expected["drift/total"], rel=1e-5)


def test_probe_pngs_are_written_for_every_state(full_run):
    trainer, _, _, _ = full_run
    from pathlib import Path

    for state in (0, 1, 2):
        folder = Path(trainer.log_dir) / "probes" / f"state_{state:02d}"
        assert sorted(p.name for p in folder.glob("*.png")) == [
            "nudity_derived_0.png",
            "nudity_derived_1.png",
            "nudity_prompt_0.png",
            "nudity_prompt_1.png",
        ]


def test_selection_exports_the_first_clean_state_and_it_equals_that_epochs_checkpoint(full_run, tiny_pipeline_dir):
    trainer, _, root, callbacks = full_run
    selector = callbacks[2]
    assert selector.selected == 1
    assert [s["probe_flagged"] for s in selector.scores] == [2, 0, 0]
    selection = json.loads((root / "rece" / "version_0" / "selected" / "selection.json").read_text())
    assert selection["state"] == 1 and "first state" in selection["reason"]
    images = selection["scores"][1]["probe"]["images"]
    high = wilson_interval(0, images)[1]
    assert f"0 of {images} probe images show" in selection["reason"]
    assert f"the true rate is <= {100 * high:.1f} % at 95 %" in selection["reason"]
    assert selection["scores"][1]["rate_ci95"] == pytest.approx([0.0, high])
    assert [s["state"] for s in selection["scores"]] == [0, 1, 2]
    # State 1 is the model after epoch 0: ModelCheckpoint's epoch=0.ckpt.
    from_export = load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), root / "rece/version_0/selected")
    from_checkpoint = load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), root / "ckpt" / "epoch=0.ckpt")
    for name, weight in diffusion.kv_weights(from_checkpoint.unet).items():
        assert torch.equal(diffusion.kv_weights(from_export.unet)[name], weight)


def test_val_nudity_rate_is_logged_per_state_and_drives_model_checkpoint(full_run):
    trainer, _, root, _ = full_run
    rates = _events(trainer.log_dir).Scalars("val/nudity_rate")
    assert [(r.step, r.value) for r in rates] == [(0, 1.0), (1, 0.0), (2, 0.0)]
    assert sorted(p.name for p in (root / "ckpt").glob("*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert trainer.checkpoint_callback.best_model_score == 0.0


def test_probe_generation_leaves_kv_weights_and_global_rng_untouched(tiny_pipeline_dir, tmp_path):
    _, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=1)
    before = {name: w.clone() for name, w in module.kv_state().items()}
    rng = torch.get_rng_state()
    probes = generate_probes(module, ProbeSettings(**TINY))
    assert torch.equal(torch.get_rng_state(), rng)
    for name, weight in module.kv_state().items():
        assert torch.equal(weight, before[name]), name
    assert probes.derived["nudity"].shape == (2, 32, 32, 3)
    assert not np.array_equal(probes.derived["nudity"], probes.prompt["nudity"])
    again = generate_probes(module, ProbeSettings(**{**TINY, "seed": 0}))
    np.testing.assert_array_equal(again.derived["nudity"], probes.derived["nudity"])


def test_never_clean_exports_the_fewest_detections_and_says_so(tiny_pipeline_dir, tmp_path):
    detector = ScriptedDetector(clean_from=None)
    selector = NudityCheckpointSelector(detector=detector, probe=PROBE)

    with pytest.warns(UserWarning, match="never clean"):
        trainer, _ = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=1, callbacks=[ShowModule(detector), selector])
    manifest = json.loads((tmp_path / "rece" / "version_0" / "selected" / "rece_manifest.json").read_text())
    assert manifest["selection"]["state"] == 0 and "never clean" in manifest["selection"]["reason"]
    assert manifest["rece_epochs"] == 0


def test_stop_when_clean_ends_the_run_early(tiny_pipeline_dir, tmp_path):
    detector = ScriptedDetector(clean_from=1)

    selector = NudityCheckpointSelector(detector=detector, stop_when_clean=True, probe=PROBE)
    trainer, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=5, callbacks=[ShowModule(detector), selector])
    assert selector.selected == 1 and module.rece_epochs_done == 1


class PatternDetector:
    """Stands in for NudeNet with a fixed verdict per state and image: ``pattern[state]`` lists, in the order the
    selector scores them, the probe images then the validation images (1 = exposed)."""

    def __init__(self, pattern: dict[int, list[int]]) -> None:
        self.pattern, self.module, self.seen = pattern, None, {}

    def detect(self, image):
        state = self.module.rece_epochs_done
        index = self.seen.get(state, 0)
        self.seen[state] = index + 1
        flagged = self.pattern[state][index]
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}] if flagged else []


# per state: 2 probe images, then 3 validation images
PATTERN = {0: [1, 1, 1, 0, 0], 1: [1, 0, 0, 0, 0], 2: [0, 0, 0, 0, 0]}


@pytest.mark.parametrize(
    "select_on,selected,rates",
    [
        ("validation", 1, [1 / 3, 0.0, 0.0]),  # the validation images are clean from state 1, the probes are not
        ("both", 2, [3 / 5, 1 / 5, 0.0]),  # the share of all checked images: 0 only when both are clean
        ("probes", 2, [1.0, 0.5, 0.0]),
    ],
)
def test_select_on_decides_which_images_must_be_clean_and_which_rate_is_monitored(
    tiny_pipeline_dir, tmp_path, select_on, selected, rates
):
    detector = PatternDetector(PATTERN)
    selector = NudityCheckpointSelector(  # select_on and validation_prompts reach the NudeNet selector too
        detector=detector,
        validation_prompts=["a photo", "a painting", "a drawing"],
        select_on=select_on,
        probe=PROBE,
    )
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/nudity_rate", mode="min", save_top_k=1, filename="{epoch}"
    )
    trainer, module = fit_tiny(
        tiny_pipeline_dir, tmp_path, max_epochs=2, callbacks=[ShowModule(detector), selector, checkpoints]
    )
    assert detector.seen == {0: 5, 1: 5, 2: 5}
    assert selector.selected == selected and module.recommended.state == selected
    events = _events(trainer.log_dir)
    assert [s.value for s in events.Scalars("val/nudity_rate")] == pytest.approx(rates)
    assert [s.value for s in events.Scalars("val/probe_rate")] == pytest.approx([1.0, 0.5, 0.0])
    assert [s.value for s in events.Scalars("val/validation_rate")] == pytest.approx([1 / 3, 0.0, 0.0])
    # ModelCheckpoint monitors the rate the selection decides on (epoch e's checkpoint is state e + 1)
    assert checkpoints.best_model_score == pytest.approx(min(rates[1:]))
    assert Path(checkpoints.best_model_path).name == f"epoch={rates[1:].index(min(rates[1:]))}.ckpt"


def test_the_fit_exports_the_selected_state_and_keeps_the_last_beside_it(full_run, tiny_pipeline_dir):
    trainer, module, root, callbacks = full_run
    assert callbacks[2].selected == 1 and module.rece_epochs_done == 2
    export, last = Path(trainer.log_dir) / "erased", Path(trainer.log_dir) / "erased_last"
    manifest = json.loads((export / "rece_manifest.json").read_text())
    assert manifest["rece_epochs"] == 1 and "first state" in manifest["selection"]
    selected = diffusion.kv_weights(load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), export).unet)
    from_checkpoint = load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), root / "ckpt" / "epoch=0.ckpt")
    final = diffusion.kv_weights(load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), last).unet)
    for name, weight in diffusion.kv_weights(from_checkpoint.unet).items():
        assert torch.equal(selected[name], weight)
        assert torch.equal(final[name], module.kv_state()[name])
    assert json.loads((last / "rece_manifest.json").read_text())["rece_epochs"] == 2


def test_uce_alone_is_observed_exported_and_selected(tiny_pipeline_dir, tmp_path):
    detector = ScriptedDetector(clean_from=0)
    callbacks = [ProbeImages(probe=PROBE), ParameterDrift(), NudityCheckpointSelector(detector=detector, probe=PROBE)]
    trainer, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=0, callbacks=[ShowModule(detector), *callbacks])
    events = _events(trainer.log_dir)
    assert [image.step for image in events.Images("probe/nudity/derived")] == [0]
    assert [s.step for s in events.Scalars("drift/total")] == [0] and events.Scalars("drift/total")[0].value > 0
    assert [s.value for s in events.Scalars("val/nudity_rate")] == [0.0]
    selection = json.loads((Path(trainer.log_dir) / "selected" / "selection.json").read_text())
    assert selection["state"] == 0 and module.recommended.state == 0
    assert (Path(trainer.log_dir) / "erased" / "rece_kv.safetensors").is_file()


def test_selected_state_follows_the_diffusers_export_format(tiny_pipeline_dir, tmp_path):
    import diffusers

    detector = ScriptedDetector(clean_from=1)
    selector = NudityCheckpointSelector(detector=detector, probe=PROBE)
    trainer, module = fit_tiny(
        tiny_pipeline_dir,
        tmp_path,
        max_epochs=2,
        callbacks=[ShowModule(detector), selector],
        export_format="diffusers",
    )
    folder = Path(trainer.log_dir) / "selected"
    plain = diffusers.DiffusionPipeline.from_pretrained(str(folder))  # plain diffusers, no project code
    expected = module.weights_for(selector.transforms[1])
    for name, weight in diffusion.kv_weights(plain.unet).items():
        assert torch.equal(weight, expected[name]), name
    assert not all(torch.equal(w, module.kv_state()[n]) for n, w in expected.items())  # state 1, not the last
    assert (folder / "selection.json").is_file() and (Path(trainer.log_dir) / "erased" / "model_index.json").is_file()


def test_a_selector_whose_scorer_misses_the_erased_concept_is_refused_before_the_model_loads(
    toy_model_dir, tmp_path, monkeypatch
):
    from callbacks import ConceptCheckpointSelector
    from rece_lightning.toyworld import ToyWorldScorer

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    selector = ConceptCheckpointSelector(scorer=ToyWorldScorer(["red"]), probe=PROBE)
    with pytest.raises(ValueError, match=r"looks for \['red'\] but the erased concept 'blue' shows as \['blue'\]"):
        fit_tiny(toy_model_dir, tmp_path, max_epochs=1, callbacks=[selector], erase_concepts=["blue"])


def test_real_nudenet_scores_tiny_pipeline_images(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    images = pipeline(
        ["a photo", "nudity"],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.manual_seed(0),
    ).images
    scorer = NudityScorer(threshold=0.6)
    raw = [scorer.detector.detect(to_bgr_uint8(image)) for image in images]
    for detections in raw:  # whatever NudeNet reports has its documented structure
        for detection in detections:
            assert {"class", "score", "box"} <= set(detection) and 0 <= detection["score"] <= 1
    found = scorer.detect(images)
    assert len(found) == 2 and all(set(f) <= set(EXPOSED_CLASSES) for f in found)


def test_the_nudity_tally_counts_each_class_once_per_image_and_the_nude_share():
    class Fixed:  # image 0: two exposed classes (one twice); image 1: a covered class only; image 2: nothing
        verdicts = [
            [
                {"class": "BELLY_EXPOSED", "score": 0.9, "box": []},
                {"class": "BELLY_EXPOSED", "score": 0.7, "box": []},
                {"class": "FEET_EXPOSED", "score": 0.8, "box": []},
            ],
            [{"class": "FEMALE_BREAST_COVERED", "score": 0.95, "box": []}],
            [],
        ]

        def __init__(self):
            self.calls = 0

        def detect(self, image):
            self.calls += 1
            return self.verdicts[self.calls - 1]

    scorer = NudityScorer(0.6, detector=Fixed())
    tally = scorer.tally(scorer.detect([np.zeros((8, 8, 3), dtype=np.float32)] * 3))
    assert tally["BELLY_EXPOSED"] == 1 and tally["FEET_EXPOSED"] == 1 and tally["total"] == 2
    assert tally["images"] == 3 and tally["nude_images"] == 1 and tally["nudity_rate"] == pytest.approx(1 / 3)


def test_threshold_and_classes_filter_detections():
    class Fixed:
        def detect(self, image):
            return [
                {"class": "BELLY_EXPOSED", "score": 0.5, "box": []},
                {"class": "FACE_FEMALE", "score": 0.99, "box": []},
                {"class": "FEET_EXPOSED", "score": 0.61, "box": []},
            ]

    image = np.zeros((8, 8, 3), dtype=np.float32)
    assert NudityScorer(0.6, detector=Fixed()).detect([image]) == [{"FEET_EXPOSED": 0.61}]
    assert NudityScorer(0.45, detector=Fixed()).detect([image]) == [{"BELLY_EXPOSED": 0.5, "FEET_EXPOSED": 0.61}]
    with pytest.raises(ValueError, match="threshold=1.5"):
        NudityScorer(1.5)
    with pytest.raises(ValueError, match="NOSE_EXPOSED"):
        NudityScorer(classes=["NOSE_EXPOSED"])


def test_bgr_conversion_matches_nudenet_convention():
    rgb = np.zeros((2, 2, 3), dtype=np.float32)
    rgb[..., 0] = 1.0  # pure red
    bgr = to_bgr_uint8(rgb)
    assert bgr.dtype == np.uint8 and bgr[0, 0].tolist() == [0, 0, 255]


def test_collapse_guard_warns_and_stops_on_an_absurd_erase_scale(tiny_pipeline_dir, tmp_path):
    guard = CollapseGuard(stop_on_collapse=True, probe=PROBE)
    with pytest.warns(UserWarning, match="collapsed"):
        trainer, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=3, erase_scale=1e12, callbacks=[guard])
    assert guard.collapsed_states and module.rece_epochs_done <= 1
    events = _events(trainer.log_dir)
    assert events.Scalars("collapse/detected")[-1].value == 1.0
    assert "collapse/reasons/text_summary" in events.Tags()["tensors"]
    assert events.Scalars("collapse/kv_drift")[-1].value > 10


def test_collapse_guard_records_the_non_finite_stop_in_tensorboard(tiny_pipeline_dir, tmp_path):
    guard = CollapseGuard(probe=PROBE)
    with pytest.raises(FloatingPointError):
        fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=2, erase_scale=1e308, callbacks=[guard])
    events = _events(tmp_path / "rece" / "version_0")
    assert events.Scalars("collapse/detected")[-1].value == 1.0
    assert "collapse/reasons/text_summary" in events.Tags()["tensors"]


def test_callback_settings_are_validated():
    with pytest.raises(ValueError, match="height=30"):
        ProbeImages(probe=ProbeSettings(height=30))
    with pytest.raises(ValueError, match="num_images=0"):
        ParameterDrift() and ProbeImages(probe=ProbeSettings(num_images=0))
    with pytest.raises(TypeError, match="probe=.* is not allowed: give a ProbeSettings"):
        ProbeImages(probe={"num_images": 2})
    with pytest.raises(ValueError, match="min_std=2"):
        CollapseGuard(min_std=2)


def test_a_missing_validation_set_stops_the_fit_before_the_model_loads(tiny_pipeline_dir, tmp_path, monkeypatch):
    selector = NudityCheckpointSelector(validation_csv="nope/validation_inappropriate.csv")  # instantiates: lazy

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    with pytest.raises(FileNotFoundError, match="validation_csv='nope/validation_inappropriate.csv'.*RECE repository"):
        fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=1, callbacks=[selector])


class CleanAt(ScriptedDetector):
    """Clean only at the given states: a run that forgets earlier states would select another one."""

    def __init__(self, clean_states: set[int]) -> None:
        super().__init__(clean_from=None)
        self.clean_states = clean_states

    def detect(self, image):
        if self.module.rece_epochs_done in self.clean_states:
            return []
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}]


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_a_resumed_run_selects_and_exports_the_same_state_bit_for_bit(tiny_pipeline_dir, tmp_path):
    def run(root, max_epochs, ckpt_path=None):
        detector = CleanAt({1})
        selector = NudityCheckpointSelector(detector=detector, probe=PROBE)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
        trainer, _ = fit_tiny(
            tiny_pipeline_dir,
            root,
            max_epochs=max_epochs,
            callbacks=[ShowModule(detector), selector, checkpoint],
            ckpt_path=ckpt_path,
        )
        return trainer, selector

    trainer, uninterrupted = run(tmp_path / "a", 3)
    _, first = run(tmp_path / "b", 2)  # "killed" after epoch 2 (state 2); state 1 was the clean one
    resumed_trainer, resumed = run(tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "ckpt" / "epoch=1.ckpt")
    assert uninterrupted.selected == resumed.selected == 1
    assert [s["state"] for s in resumed.scores] == [0, 1, 2, 3]
    assert [s["probe_flagged"] for s in resumed.scores] == [s["probe_flagged"] for s in uninterrupted.scores]
    exported = Path(trainer.log_dir) / "selected" / "rece_kv.safetensors"
    resumed_export = Path(resumed_trainer.log_dir) / "selected" / "rece_kv.safetensors"
    # bit for bit in the weights (the safetensors header's metadata order varies between processes)
    from safetensors.torch import load_file

    first_weights, resumed_weights = load_file(str(exported)), load_file(str(resumed_export))
    assert first_weights.keys() == resumed_weights.keys()
    for name, weight in first_weights.items():
        assert torch.equal(weight, resumed_weights[name]), name


def test_callbacks_sharing_one_probe_object_generate_each_state_once(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    calls = []
    original = StableDiffusionPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("num_inference_steps"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    detector = ScriptedDetector(clean_from=None)
    callbacks = [
        ShowModule(detector),
        ProbeImages(probe=PROBE, save_png=False),
        NudityCheckpointSelector(detector=detector, probe=PROBE),
        CollapseGuard(probe=PROBE),
    ]
    with pytest.warns(UserWarning, match="never clean"):
        fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=1, callbacks=callbacks)
    assert len(calls) == 2  # states 0 and 1, one batched call each, for all three callbacks
