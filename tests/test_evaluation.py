"""Evaluation through Lightning on the tiny pipeline: exactly-once generation, resume, metrics, reports, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from rece_lightning.data import PromptDataModule, PromptDataset, UnpaddedDistributedSampler, read_prompt_csv
from rece_lightning.evaluation import ErasureEvaluator, NudityScorer
from rece_lightning.evaluation.features import RandomConvFeatures
from tests.conftest import datasets_or_skip, fit_tiny

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_inference_steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def erased_export(tiny_pipeline_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("erased")
    fit_tiny(tiny_pipeline_dir, root, max_epochs=1)
    return root / "rece" / "version_0" / "erased"


@pytest.fixture(scope="module")
def tiny_clip(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A tiny random CLIP saved like a hub model, so CLIPScore runs offline through the same `clip_model` option."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_pipeline_dir / "tokenizer"))
    config = CLIPConfig(
        text_config={
            "vocab_size": max(len(tokenizer), 1000),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def _evaluate(pipeline_dir, erased, output_dir, root, *, metrics, limit=5, offset=0, batch_size=2, **kwargs):
    datasets = datasets_or_skip()
    data = PromptDataModule(str(datasets / "i2p.csv"), offset=offset, limit=limit, batch_size=batch_size)
    model = ErasureEvaluator(
        str(pipeline_dir), erased=str(erased), metrics=metrics, output_dir=str(output_dir), **SMALL, **kwargs
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(model, datamodule=data)
    return model, data


def test_original_and_erased_are_generated_once_per_prompt_and_scored(
    tiny_pipeline_dir, erased_export, tiny_clip, tmp_path
):
    output = tmp_path / "eval"
    model, data = _evaluate(
        tiny_pipeline_dir,
        erased_export,
        output,
        tmp_path,
        metrics=["nudity", "asr", "clip", "fid", "lpips"],
        clip_model=str(tiny_clip),
        fid_feature=RandomConvFeatures(for_fid=True),
        lpips_net=RandomConvFeatures(),
    )
    cases = sorted(int(n) for n in data.frame["case_number"])
    for variant in ("original", "erased"):
        files = sorted(p.name for p in (output / variant).glob("*.png"))
        assert files == sorted(f"{c}_0.png" for c in cases)
    report = json.loads((output / "results.json").read_text())["results"]
    for variant in ("original", "erased"):
        assert report[variant]["num_prompts"] == report[variant]["num_images"] == 5
        assert set(report[variant]["nudity"]) >= {"FEMALE_BREAST_EXPOSED", "total", "nudity_rate"}
        assert 0 <= report[variant]["asr"]["attack_success_rate"] <= 1
        assert np.isfinite(report[variant]["clip_score"])
    comparison = report["erased_vs_original"]
    assert comparison["fid"] >= 0 and comparison["lpips"] > 0  # the erased model's images differ from the original's
    table = (output / "results.md").read_text()
    assert "| original |" in table and "| erased |" in table and "Breast(F)" in table and "ASR %" in table


def test_nudenet_tally_matches_a_direct_count_over_the_saved_images(tiny_pipeline_dir, erased_export, tmp_path):
    output = tmp_path / "eval"
    _evaluate(tiny_pipeline_dir, erased_export, output, tmp_path, metrics=["nudity"], nudity_threshold=0.05, limit=4)
    report = json.loads((output / "results.json").read_text())["results"]
    scorer = NudityScorer(threshold=0.05)
    for variant in ("original", "erased"):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((output / variant).glob("*.png"))]
        direct = scorer.tally(scorer.detect(images))
        for label in scorer.classes:
            assert report[variant]["nudity"][label] == direct[label], (variant, label)
        assert report[variant]["nudity"]["nude_images"] == direct["nude_images"]


def test_a_rerun_generates_only_the_missing_images_and_overwrites_nothing(
    tiny_pipeline_dir, erased_export, tmp_path, monkeypatch
):
    output = tmp_path / "eval"
    _evaluate(tiny_pipeline_dir, erased_export, output, tmp_path, metrics=["nudity"])
    first = json.loads((output / "results.json").read_text())["results"]
    kept = {p: p.stat().st_mtime_ns for p in output.rglob("*.png")}
    removed = [output / "erased" / sorted(p.name for p in (output / "erased").glob("*.png"))[i] for i in (0, 3)]
    for path in removed:
        kept.pop(path)
        path.unlink()

    generated: list[str] = []
    original_generate = ErasureEvaluator._generate

    def counting(self, items, guidance):
        generated.extend(f"{item.case_number}_{item.index}.png" for item in items)
        return original_generate(self, items, guidance)

    monkeypatch.setattr(ErasureEvaluator, "_generate", counting)
    _evaluate(tiny_pipeline_dir, erased_export, output, tmp_path, metrics=["nudity"])
    assert sorted(generated) == sorted(p.name for p in removed)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert json.loads((output / "results.json").read_text())["results"] == first


def test_unpadded_sampler_gives_every_item_to_exactly_one_rank():
    dataset = list(range(3))
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=4, rank=r)) for r in range(4)]
    assert shards == [[0], [1], [2], []]
    assert sorted(i for shard in shards for i in shard) == [0, 1, 2]
    odd = [list(UnpaddedDistributedSampler(list(range(7)), num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(odd[0] + odd[1]) == list(range(7)) and len(odd[0]) == 4 and len(odd[1]) == 3


def test_prompt_csvs_of_the_paper_are_read_with_their_seeds_and_filters():
    datasets = datasets_or_skip()
    i2p = read_prompt_csv(str(datasets / "i2p.csv"), categories=["sexual"], limit=10)
    assert len(i2p) == 10 and all("sexual" in c for c in i2p["categories"])
    full = read_prompt_csv(str(datasets / "i2p.csv"))
    assert len(full) == 4703 and full["guidance"].nunique() > 1
    ring = read_prompt_csv(str(datasets / "nudity-ring-a-bell.csv"))
    assert len(ring) == 79 and (ring["seed"] == 42).all() and list(ring["case_number"]) == list(range(79))
    artists = read_prompt_csv(str(datasets / "big_artist_prompts.csv"), artists=["Van Gogh"])
    assert len(artists) == 20 and set(artists["artist"]) == {"Van Gogh"}
    items = PromptDataset(artists.head(2), images_per_prompt=3).items
    assert [(i.index, i.seed - items[0].seed) for i in items[:3]] == [(0, 0), (1, 1), (2, 2)]
    assert items[0].group == "Van Gogh"


def test_bad_evaluation_input_is_refused_with_the_value(tiny_pipeline_dir, erased_export, tmp_path):
    datasets = datasets_or_skip()
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        PromptDataModule(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    with pytest.raises(ValueError, match=r"no prompt column .* \['text', 'seed'\]"):
        PromptDataModule(str(bad))
    with pytest.raises(ValueError, match="no prompt of .* is selected"):
        PromptDataModule(str(datasets / "i2p.csv"), categories=["no-such-category"])
    with pytest.raises(ValueError, match="offset=5000"):
        PromptDataModule(str(datasets / "nudity.csv"), offset=5000)
    with pytest.raises(ValueError, match="'blur'"):
        ErasureEvaluator(str(tiny_pipeline_dir), erased=str(erased_export), metrics=["blur"])
    with pytest.raises(FileNotFoundError, match="missing-export"):
        ErasureEvaluator(str(tiny_pipeline_dir), erased=str(tmp_path / "missing-export"))
    with pytest.raises(ValueError, match="compare the erased model with the original"):
        ErasureEvaluator(str(tiny_pipeline_dir), erased=str(erased_export), evaluate_original=False, metrics=["fid"])


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_two_ddp_processes_score_each_prompt_once_and_match_one_process(tiny_pipeline_dir, erased_export, tmp_path):
    datasets = datasets_or_skip()
    common = [
        "test",
        "--config",
        str(REPO / "configs" / "eval_smoke.yaml"),
        f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}",
        f"--model.erased={erased_export}",
        f"--data.prompts_csv={datasets / 'nudity.csv'}",
        "--data.limit=7",  # odd on purpose: DistributedSampler would pad it to 8
        "--model.height=32",
        "--model.width=32",
        "--model.num_inference_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    runs = {}
    for name, extra in (
        ("one", ["--trainer.devices=1"]),
        ("two", ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]),
    ):
        output = tmp_path / name
        done = _cli(
            [*common, *extra, f"--model.output_dir={output}", f"--trainer.default_root_dir={tmp_path}"], tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((output / "results.json").read_text())
        for variant in ("original", "erased"):
            assert len(list((output / variant).glob("*.png"))) == 7
    assert runs["two"]["run"]["processes"] == 2
    one, two = runs["one"]["results"], runs["two"]["results"]
    for variant in ("original", "erased"):
        assert two[variant]["num_prompts"] == two[variant]["num_images"] == 7  # each prompt exactly once
        assert two[variant]["nudity"] == one[variant]["nudity"]
        assert two[variant]["asr"] == one[variant]["asr"]
    for name, value in one["erased_vs_original"].items():
        # rel 1e-3: the two processes sum fp32 features in another order
        assert two["erased_vs_original"][name] == pytest.approx(value, rel=1e-3, abs=1e-6), name
