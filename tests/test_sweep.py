"""``train.py sweep``: a grid of real fits from one base-model cache, its report, and keys refused before any model."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest

from rece_lightning import base_cache, closed_form
from rece_lightning.evaluation.statistics import wilson_interval
from rece_lightning.sweep import parse_sweep, run_sweep
from train import cli_main, main

REPO = Path(__file__).resolve().parents[1]


def test_keys_resolve_to_their_sections_and_the_grid_is_their_product(monkeypatch):
    monkeypatch.chdir(REPO)
    args = ["--config", "configs/toy.yaml", "--sweep.reg", "[1e-3, 0.1]", "--sweep.max_epochs=[2, 4]"]
    rest, settings, flags, _, logged = parse_sweep(args + ["--sweep.stop_when_clean", "false"])
    assert rest == ["--config", "configs/toy.yaml"] and logged
    assert flags == {
        "reg": "--model.method.reg",
        "max_epochs": "--trainer.max_epochs",
        "stop_when_clean": "--selector.init_args.stop_when_clean",
    }
    assert [(s["reg"], s["max_epochs"]) for s in settings] == [(1e-3, 2), (1e-3, 4), (0.1, 2), (0.1, 4)]


def test_a_key_that_is_no_option_stops_before_any_model_loads(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(closed_form, "gram_matrix", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        main(["sweep", "--config", "configs/toy.yaml", "--sweep.colour", "[1, 2]"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--sweep.colour is not a model or trainer option" in error and "'reg'" in error
    with pytest.raises(SystemExit):  # a bad value of a real key: every setting is parsed before the first fit
        main(["sweep", "--config", "configs/toy.yaml", "--sweep.reg", "[0.1, -1]"])
    assert "reg" in capsys.readouterr().err


@pytest.mark.slow  # two toy fits of one epoch: about 30 s
def test_a_sweep_fits_every_setting_from_one_gram_and_reports_the_trade_off(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(base_cache, "_MEMORY", OrderedDict())  # no earlier test's cached toy Gram matrix
    grams = []
    original = closed_form.gram_matrix
    monkeypatch.setattr(closed_form, "gram_matrix", lambda *a, **k: grams.append(1) or original(*a, **k))
    records = run_sweep(
        [
            "--config",
            "configs/toy.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--sweep.reg",
            "[0.001, 1.0]",
            "--sweep.max_epochs",
            "1",
            "--sweep_dir",
            str(tmp_path / "report"),
        ],
        cli_main,
    )
    assert len(grams) == 1  # the second fit reused the first one's G
    assert [r["setting"]["reg"] for r in records] == [0.001, 1.0]
    for record in records:
        assert [s["state"] for s in record["states"]] == [0, 1]
        assert record["selected_state"] in (0, 1) and record["selection"]
        assert (Path(record["log_dir"]) / "erased" / "rece_kv.safetensors").is_file()
        assert all(s["drift"] > 0 and s["preservation_change"] > 0 for s in record["states"])
        assert all(s["probe_rate_ci95"] is not None and s["prompt_rate"] is not None for s in record["states"])
        assert all(0 <= s["kept_rate_ci95"][0] <= s["kept_rate"] <= s["kept_rate_ci95"][1] for s in record["states"])
    # reg changes the derived embedding, hence the first round's edit
    assert records[0]["states"][1]["drift"] != pytest.approx(records[1]["states"][1]["drift"])
    report = json.loads((tmp_path / "report" / "sweep.json").read_text())
    assert len(report["settings"]) == 2
    table = (tmp_path / "report" / "sweep.md").read_text()
    assert "| reg=0.001,max_epochs=1 | 0" in table and "**(selected)**" in table
    assert (tmp_path / "report" / "sweep.png").is_file()


def test_kept_concepts_are_checked_against_the_scorer():
    from callbacks import ConceptPreservation
    from rece_lightning.toyworld import ToyWorldScorer

    scorer = ToyWorldScorer(["green", "blue"])
    with pytest.raises(ValueError, match="class 'yellow', which the scorer does not detect"):
        ConceptPreservation(scorer, {"yellow": ["a yellow square"]})
    with pytest.raises(ValueError, match=r"prompts\['green'\]=\[\] is not allowed"):
        ConceptPreservation(scorer, {"green": []})
    with pytest.raises(ValueError, match="prompts={} is not allowed"):
        ConceptPreservation(scorer, {})


def test_kept_rate_counts_the_images_that_show_their_own_class(monkeypatch):
    """The scorer's verdicts on a scripted state: green kept in 1 of 2 images, blue in 2 of 2."""
    from types import SimpleNamespace

    import numpy as np

    from callbacks import ConceptPreservation, preservation
    from rece_lightning.toyworld import ToyWorldScorer

    callback = ConceptPreservation(ToyWorldScorer(["green", "blue"]), {"green": ["g1", "g2"], "blue": ["b1", "b2"]})
    monkeypatch.setattr(preservation, "generate_prompt_images", lambda *a, **k: np.zeros((4, 8, 8, 3)))
    monkeypatch.setattr(callback.scorer, "detect", lambda images: [{"green": 1.0}, {}, {"blue": 0.9}, {"blue": 1.0}])
    module = SimpleNamespace(rece_epochs_done=2)
    callback.observe(SimpleNamespace(loggers=[]), module, after_epoch=True)
    record = callback.history[-1]
    assert record["state"] == 2 and record["kept_rate"] == 0.75
    assert record["per_class"] == {"green": 0.5, "blue": 1.0}
    assert record["kept_rate_ci95"] == pytest.approx(list(wilson_interval(3, 4)))
