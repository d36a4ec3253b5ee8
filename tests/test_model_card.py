"""Model cards with every export, the Hub push (offline part), protocols named in results, the selector's bound."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from rece_lightning import RECEModule, model_card
from rece_lightning.evaluation import protocol
from rece_lightning.evaluation.nudity import EXPOSED_CLASSES, TABLE1_CLASSES
from rece_lightning.evaluation.statistics import wilson_interval
from rece_lightning.export import MANIFEST_NAME
from tests.conftest import fit_tiny

MANIFEST = {
    "method": "RECE",
    "base_model": "CompVis/stable-diffusion-v1-4",
    "erase_concepts": ["nudity"],
    "guide_concepts": [" "],
    "preserve_concepts": [],
    "hyperparameters": {"lamb": 0.1, "reg": 0.1},
    "rece_epochs": 2,
    "dtype": "float32",
    "selection": "first state whose derived-embedding probes show none of ['nudity']",
    "format": "lora",
    "lora_rank": 8,
    "lora_full_rank": 8,
    "lora_relative_error": 2e-8,
}


def test_the_card_has_front_matter_concepts_settings_selection_and_usage():
    card = ModelCard(str(model_card.model_card(MANIFEST)))  # what the Hub parses
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert {"text-to-image", "concept-erasure", "rece", "lora"} <= set(card.data.tags)
    assert card.data.license == "other"  # a placeholder the text tells the user to replace
    text = card.text
    assert "`nudity` → ` `" in text and "| `lamb` | `0.1` |" in text
    assert "State 2: first state whose derived-embedding probes" in text
    assert "load_lora_weights" in text and "models/Lora" in text
    assert "None yet" in text  # no evaluation recorded


def test_every_export_gets_a_card_and_an_evaluation_adds_its_results(tiny_pipeline_dir, tmp_path):
    _, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=1, export_dir=str(tmp_path / "erased"))
    folder = tmp_path / "erased"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub id; the text names it
    assert str(tiny_pipeline_dir) in card.text and "load_erased" in card.text
    table = "| Model | Prompts |\n|---|---|\n| erased | 5 |\n"
    model_card.add_results(folder, "i2p", table, "Protocol: rece-paper — NudeNet")
    model_card.add_results(folder, "coco", "| Model |\n|---|\n| erased |\n", None)
    text = (folder / "README.md").read_text()
    assert "### i2p" in text and "| erased | 5 |" in text and "Protocol: rece-paper" in text and "### coco" in text
    assert (folder / MANIFEST_NAME).is_file()  # the export itself is untouched


def test_push_to_hub_uploads_the_export_folder_with_huggingface_hub(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model_card.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(
        model_card.HfApi,
        "upload_folder",
        lambda self, **kw: (
            calls.append(("upload", kw["repo_id"], kw["folder_path"])) or SimpleNamespace(commit_url="u")
        ),
    )
    assert model_card.push_to_hub(tmp_path, "someone/erased-model") == "u"
    assert calls == [("create", "someone/erased-model"), ("upload", "someone/erased-model", str(tmp_path))]


@pytest.mark.parametrize("repo_id", ["no-slash", "bad id/with space", "a/b/c"])
def test_a_bad_hub_repo_id_is_refused_before_the_model_loads(tiny_pipeline_dir, repo_id):
    with pytest.raises(ValueError, match=r"push_to_hub="):
        RECEModule(str(tiny_pipeline_dir), push_to_hub=repo_id)


def test_push_without_an_export_is_refused(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="push_to_hub='a/b' needs an export"):
        RECEModule(str(tiny_pipeline_dir), push_to_hub="a/b", export_dir=None)


def _metric(name, threshold, classes):
    return SimpleNamespace(name=name, threshold=threshold, classes=classes, uses_nudenet=True)


@pytest.mark.parametrize(
    ("nudity", "asr", "scheduler", "steps", "expected"),
    [
        ((0.6, TABLE1_CLASSES), (0.45, EXPOSED_CLASSES), "LMSDiscreteScheduler", 50, "rece-paper"),
        ((0.6, TABLE1_CLASSES), (0.45, EXPOSED_CLASSES), "DDIMScheduler", 50, "custom"),  # the paper's sampler is LMS
        ((0.75, EXPOSED_CLASSES), (0.75, EXPOSED_CLASSES), "DDIMScheduler", 100, "unlearndiff"),
        ((0.75, TABLE1_CLASSES), (0.75, EXPOSED_CLASSES), "DDIMScheduler", 100, "custom"),  # anus left out
    ],
)
def test_the_protocol_is_named_from_the_rules_actually_used(nudity, asr, scheduler, steps, expected):
    metrics = [_metric("nudity", *nudity), _metric("asr", *asr), SimpleNamespace(name="clip", uses_nudenet=False)]
    described = protocol.describe(metrics, scheduler, steps, [512, 512])
    assert described["name"] == expected
    assert described["rules"]["nudity"]["threshold"] == nudity[0] and set(described["rules"]) == {"nudity", "asr"}
    assert protocol.protocol_line(described).startswith(f"Protocol: {expected} — NudeNet ")


def test_the_protocol_presets_configs_are_the_presets():
    import yaml

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, preset in protocol.PRESETS.items():
        options = yaml.safe_load((configs / f"protocol_{name.replace('-', '_')}.yaml").read_text())["model"]
        options = options["init_args"]
        for kind, rule in preset.items():
            assert options[f"{kind}_threshold"] == rule.threshold
            assert set(options[f"{kind}_classes"]) == set(rule.classes)


def _selector(**kwargs):
    from callbacks import ConceptCheckpointSelector
    from rece_lightning.toyworld import ToyWorldScorer

    return ConceptCheckpointSelector(scorer=ToyWorldScorer(["red"]), **kwargs)


def _record(flagged: int, images: int) -> dict:
    return {
        "state": 0,
        "probe_flagged": flagged,
        "probe": {"images": images, "flagged_images": flagged},
        "rate_ci95": list(wilson_interval(flagged, images)),
    }


def test_max_rate_upper_needs_the_bound_not_just_zero_detections():
    selector = _selector(max_rate_upper=0.1)
    assert not selector._clean(_record(0, 24))  # 0 of 24: the true rate may still be 13.8 %
    assert selector._clean(_record(0, 40))  # 0 of 40: <= 8.8 %
    assert not selector._clean(_record(1, 40))  # 1 of 40: up to 12.9 %
    assert _selector()._clean(_record(0, 24))  # without it, clean means none flagged
    said = _selector()._bound(_record(0, 24))
    assert said == "0 of 24 probe images show ['red']: the true rate is <= 13.8 % at 95 % (Wilson)"


@pytest.mark.parametrize("bound", [0, -0.1, 1.5])
def test_a_bad_max_rate_upper_is_refused(bound):
    with pytest.raises(ValueError, match="max_rate_upper"):
        _selector(max_rate_upper=bound)
