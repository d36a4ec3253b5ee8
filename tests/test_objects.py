"""Object erasure's metric: a transformers image classifier's top-1 accuracy on the erased class and the others."""

from __future__ import annotations

import numpy as np
import pytest

from rece_lightning.data import PromptItem
from rece_lightning.evaluation.metrics import ObjectAccuracy
from rece_lightning.evaluation.statistics import wilson_interval
from rece_lightning.testing import build_tiny_classifier

IMAGENET_LABELS = ["tench, Tinca tinca", "church, church building", "gas pump, gasoline pump, petrol pump", "golf ball"]


@pytest.fixture(scope="module")
def church_classifier(tmp_path_factory):
    """Predicts "church, church building" for every image."""
    return build_tiny_classifier(tmp_path_factory.mktemp("classifier"), IMAGENET_LABELS, favour=IMAGENET_LABELS[1])


def _items(classes):
    return [PromptItem(i, 0, f"a photo of a {c}", i, 7.5, group=c) for i, c in enumerate(classes)]


def test_top1_accuracy_on_the_erased_class_and_the_others(church_classifier):
    metric = ObjectAccuracy(str(church_classifier), erased_classes=["church"], classes=["tench", "church", "gas pump"])
    metric.bind(["erased"])
    classes = ["church", "church", "tench", "gas pump", "gas pump", "golf ball"]  # golf ball: not scored
    images = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(len(classes))]
    metric.update(_items(classes), {"erased": images})
    figures = metric.compute()["erased"]["object"]
    # independently: the classifier's own top-1 labels, matched by name
    predicted = metric.predictions(images)
    assert predicted == [1] * len(images)  # the favoured label: the counts below are not all zeros
    assert figures["erased_accuracy"] == 1.0 and figures["other_accuracy"] == 0.0
    assert figures["erased_accuracy_ci95"] == pytest.approx(list(wilson_interval(2, 2)))
    assert figures["other_accuracy_ci95"] == pytest.approx(list(wilson_interval(0, 3)))
    assert figures["per_class"] == {"church": 1.0, "tench": 0.0, "gas pump": 0.0}
    (header, cells), _ = metric.columns({"erased": metric.compute()["erased"]})
    assert header.startswith("church top-1 %") and cells["erased"].startswith("100.00 [")


def test_a_class_the_classifier_has_no_label_for_is_refused_before_any_weights_load(church_classifier, monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForImageClassification, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded")
    )
    with pytest.raises(ValueError, match=r"has no label for \['unicorn'\]"):
        ObjectAccuracy(str(church_classifier), classes=["church", "unicorn"])
    with pytest.raises(ValueError, match=r"erased_classes \['castle'\] are not among the scored classes"):
        ObjectAccuracy(str(church_classifier), erased_classes=["castle"], classes=["church"])


def test_a_hub_classifier_not_in_the_cache_is_checked_once_it_loads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = ObjectAccuracy("someone/not-cached-classifier", erased_classes=["church"])  # a config instantiates
    assert metric._index is None


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_the_evaluator_scores_objects_on_the_shipped_prompt_format(tiny_pipeline_dir, unedited_export, tmp_path):
    import lightning.pytorch as pl

    from rece_lightning.data import PromptDataModule
    from rece_lightning.evaluation import ErasureEvaluator
    from rece_lightning.evaluation.metrics.objects import IMAGENETTE_CLASSES

    labels = [f"{c}, synonym" for c in IMAGENETTE_CLASSES]
    classifier = build_tiny_classifier(tmp_path / "resnet", labels, favour=labels[IMAGENETTE_CLASSES.index("church")])
    csv = tmp_path / "objects.csv"
    csv.write_text(
        "case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
        "0,a photo of a church,0,7.5,church\n1,a photo of a church,1,7.5,church\n"
        "2,a photo of a tench,0,7.5,tench\n3,a photo of a golf ball,0,7.5,golf ball\n"
    )
    model = ErasureEvaluator(
        str(tiny_pipeline_dir),
        erased=str(unedited_export),
        metrics=[ObjectAccuracy(str(classifier), erased_classes=["church"])],
        num_inference_steps=2,
        height=32,
        width=32,
        output_dir=str(tmp_path / "eval"),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(model, datamodule=PromptDataModule(str(csv), batch_size=2))
    for variant in ("original", "erased"):
        figures = model.results[variant]["object"]
        assert figures["erased_accuracy"] == 1.0 and figures["other_accuracy"] == 0.0  # 2 church, 2 other images
        assert figures["per_class"] == {"church": 1.0, "tench": 0.0, "golf ball": 0.0}
    assert "church top-1 %" in (tmp_path / "eval" / "results.md").read_text()
