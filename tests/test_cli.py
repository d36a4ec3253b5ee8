"""Every config parses against the code's signatures; the smoke config runs end to end in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rece_lightning.testing import TinyPipeline
from tests.conftest import datasets_or_skip
from train import cli_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {
        "rece.yaml",
        "rece_vangogh.yaml",
        "smoke.yaml",
        "eval_smoke.yaml",
        "eval_i2p.yaml",
        "eval_attacks.yaml",
        "eval_ringabell.yaml",
        "eval_coco.yaml",
        "eval_artists.yaml",
        "redteam_derived.yaml",
        "redteam_unlearndiff.yaml",
        "redteam_ringabell.yaml",
        "redteam_toy.yaml",
    } <= {c.name for c in CONFIGS}


HUB_SETS_HERE = {"AIML-TUDA/i2p": "i2p.csv"}  # hub datasets the configs name, and their copies in ../shared/datasets


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_against_the_code_and_is_headed_by_its_command(
    config, tiny_pipeline_dir, unedited_export, toy_model_dir, unedited_toy_export, tmp_path
):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# python train.py ") and config.name in first_line
    subcommand = first_line.split()[3]
    args = _config_args(config)
    if subcommand == "test":
        # Evaluation configs name a model folder, an export and a prompt CSV that exist only after other runs: point
        # them at the tiny pipeline, an export of it and the same CSV in ../shared/datasets.
        csv = _composed(config)["data"]["init_args"]["prompts_csv"]
        shipped = Path(__file__).resolve().parents[1] / csv  # the toy world's prompts ship with the project
        name = HUB_SETS_HERE.get(csv, Path(csv).name)
        shared_csv = shipped if shipped.is_file() else datasets_or_skip() / name
        args += [f"--data.prompts_csv={shared_csv}"]
        if _on_toy_model(config):  # erased weights must fit the base model: the toy model's own K/V
            args += [f"--model.pretrained_model_name_or_path={toy_model_dir}", f"--model.erased={unedited_toy_export}"]
        else:
            args += [f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}", f"--model.erased={unedited_export}"]
    cli = cli_main(args, run=False)
    assert cli.model is not None
    if subcommand == "fit":
        assert cli.trainer.max_epochs is not None
    else:
        assert cli.datamodule.num_prompts > 0


@pytest.mark.slow  # end to end
def test_smoke_config_runs_the_whole_loop_and_prints_what_is_worth_reading(
    tmp_path, monkeypatch, capfd, caplog, recwarn
):
    import logging

    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)
    tokenizer = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"
    args = ["fit", "--config", str(config)]
    if tokenizer.is_dir():
        args.append(f"--model.pretrained_model_name_or_path.tokenizer={tokenizer}")
    caplog.set_level(logging.INFO)
    cli = cli_main(args)
    assert cli.model.rece_epochs_done == cli.trainer.max_epochs
    assert list(tmp_path.glob("runs/smoke/**/erased/rece_kv.safetensors"))
    printed = capfd.readouterr()
    said = printed.out + printed.err + caplog.text + "\n".join(str(w.message) for w in recwarn)
    for noise in ("litlogger", "configure_optimizers", "Total params", "accelerate", "torchvision", "Epoch ", "v_num"):
        assert noise not in said, noise
    assert f"round {cli.trainer.max_epochs}/{cli.trainer.max_epochs}" in said  # 1-based, of max_epochs
    assert "derive-erase rounds after the UCE edit; logs in" in said


def test_user_overrides_reach_the_module():
    config = Path(__file__).resolve().parents[1] / "configs" / "rece.yaml"
    cli = cli_main(["--config", str(config), "--model.method.lamb=0.5", "--model.method.reg=0.01"], run=False)
    assert cli.model.method.lamb == 0.5 and cli.model.method.reg == 0.01


def test_an_evaluation_config_without_an_erased_model_stops_with_a_message(tiny_pipeline_dir):
    config = Path(__file__).resolve().parents[1] / "configs" / "eval_smoke.yaml"
    csv = datasets_or_skip() / "i2p.csv"
    args = ["--config", str(config), f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}"]
    args += [f"--data.prompts_csv={csv}", "--model.erased=null"]
    with pytest.raises(ValueError, match=r"--model.original_only=true to evaluate the original model alone"):
        cli_main(args, run=False)
    cli = cli_main([*args, "--model.original_only=true", "--model.metrics=[nudity]"], run=False)
    assert cli.model.variants == ["original"]


def test_a_fit_without_max_epochs_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from rece_lightning import diffusion

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    with pytest.raises(ValueError, match="max_epochs is not set: give the number of derive-erase rounds"):
        cli_main(["fit", "--config", str(config), "--trainer.max_epochs=null"])


def _train_py(args: list[str], cwd: Path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("RECE_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, str(repo / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


BAD_VALUES = [
    ("--model.method.lamb=nan", "--model.method.lamb: nan is not allowed: non-finite values (nan, inf) are refused"),
    ("--model.export_dir=config.yaml", "export_dir='config.yaml' is a file, not a folder"),
    ("--ckpt_path=missing.ckpt", "ckpt_path='missing.ckpt' does not exist"),
    ("--ckpt_path=corrupt.ckpt", "'corrupt.ckpt' is neither a RECE export (rece_kv.safetensors) nor a readable"),
    ("--model.export_dir=/proc/rece-x", "export_dir='/proc/rece-x' cannot be written"),  # root may "access" /proc
    ("--model.method.lamb=1e30", "lamb=1e+30 is not allowed: it must be a finite number > 0 and <= 1e+06"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_a_bad_value_prints_one_short_line_and_exits_2(tmp_path, override, message, monkeypatch, capsys):
    """``train.main``, what ``python train.py`` runs, in-process (the command line itself: the test below)."""
    from train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECE_TRACEBACK", raising=False)
    (tmp_path / "config.yaml").write_text("a file where a folder is expected\n")
    (tmp_path / "corrupt.ckpt").write_bytes(b"PK\x03\x04 a truncated zip")
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config), override])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr and "Namespace(" not in stderr
    assert not (tmp_path / "runs" / "smoke" / "tiny-sd").exists()  # nothing heavy was started


@pytest.mark.slow  # a process of its own
def test_the_command_line_prints_one_short_line_and_exits_2(tmp_path):
    override, message = BAD_VALUES[0]
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    done = _train_py(["fit", "--config", str(config), override], tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Namespace(" not in done.stderr


def test_a_failed_start_leaves_no_empty_version_folder(tmp_path, monkeypatch):
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="trainer.precision='bf16-true' is not allowed"):
        cli_main(["fit", "--config", str(config), "--trainer.precision=bf16-true"])
    assert not list(tmp_path.glob("runs/smoke/rece/version_*"))
    (tmp_path / "runs" / "smoke" / "rece" / "version_0").mkdir(parents=True)  # an earlier run's folder stays
    (tmp_path / "runs" / "smoke" / "rece" / "version_0" / "config.yaml").write_text("x: 1\\n")
    with pytest.raises(ValueError):
        cli_main(["fit", "--config", str(config), "--trainer.precision=bf16-true"])
    assert [p.name for p in tmp_path.glob("runs/smoke/rece/version_*")] == ["version_0"]


def test_output_folders_that_are_files_are_refused_before_the_model_loads(tiny_pipeline_dir, unedited_export, tmp_path):
    from rece_lightning import RECEModule
    from rece_lightning.evaluation import ErasureEvaluator

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="output_dir=.*a-file.* is a file"):
        ErasureEvaluator(str(tiny_pipeline_dir), erased=str(unedited_export), output_dir=str(blocker))
    with pytest.raises(NotADirectoryError, match="cannot be made"):
        ErasureEvaluator(str(tiny_pipeline_dir), erased=str(unedited_export), output_dir=str(blocker / "inside"))
    with pytest.raises(NotADirectoryError, match="export_dir=.*is a file"):
        RECEModule(str(tiny_pipeline_dir), export_dir=str(blocker))
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        RECEModule(str(blocker))
    with pytest.raises(NotADirectoryError, match="is a file: TinyPipeline writes"):
        RECEModule(TinyPipeline(str(blocker)))


@pytest.mark.slow  # two fits
def test_a_resumed_fit_logs_on_into_its_version_folder(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)
    tokenizer = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"
    args = ["fit", "--config", str(config), "--trainer.enable_progress_bar=false"]
    if tokenizer.is_dir():
        args.append(f"--model.pretrained_model_name_or_path.tokenizer={tokenizer}")
    cli_main([*args, "--trainer.max_epochs=2"])
    version = tmp_path / "runs" / "smoke" / "rece" / "version_0"
    resumed = cli_main([*args, "--trainer.max_epochs=3", f"--ckpt_path={version / 'checkpoints' / 'epoch=1.ckpt'}"])
    assert Path(resumed.trainer.log_dir).resolve() == version
    assert [p.name for p in version.parent.iterdir()] == ["version_0"]
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted({s.step for s in events.Scalars("drift/total")}) == [0, 1, 2, 3]
    assert resumed.model.rece_epochs_done == 3


def _config_args(config: Path) -> list[str]:
    """The ``--config`` files its header's command composes (a recipe names its base config first)."""
    words = config.read_text().splitlines()[0].split()
    named = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    return [arg for name in named for arg in ("--config", str(config.parents[1] / name))]


def _merged(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _composed(config: Path) -> dict:
    """The YAML of the configs its header composes, merged in order (a recipe over its base)."""
    names = _config_args(config)[1::2]
    composed: dict = {}
    for name in names:
        composed = _merged(composed, yaml.safe_load(Path(name).read_text()))
    return composed


def _on_toy_model(config: Path) -> bool:
    return _composed(config)["model"]["init_args"].get("pretrained_model_name_or_path") == "models/toyworld-sd"


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_every_config_instantiates_in_a_bare_clone_offline(
    tmp_path, monkeypatch, tiny_pipeline_dir, unedited_export, unedited_toy_export
):
    """No ../shared, no network: configs name prompt sets that are not here, and still instantiate (the sets are
    read when a run needs them). Only what earlier runs produce is given: the export to evaluate, and the smoke
    run's tiny pipeline."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in listed.stdout.splitlines():
        if (repo / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, clone / name)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = sorted((clone / "configs").glob("*.yaml"))
    assert len(configs) == len(CONFIGS)
    for config in configs:
        args = _config_args(config)
        if config.read_text().splitlines()[0].split()[3] == "test":
            args.append(f"--model.erased={unedited_toy_export if _on_toy_model(config) else unedited_export}")
            if config.name == "eval_smoke.yaml":
                args.append(f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}")
        cli = cli_main(args, run=False)
        assert cli.model is not None, config.name


@pytest.mark.slow  # three processes in all
def test_a_fit_on_two_processes_selects_and_exports_what_one_process_does(tmp_path):
    """The toy config (real images, real detections) on 1 and on 2 CPU processes: probes and validation images are
    shared out and gathered, the state is replicated, files come from rank 0."""
    import json
    import shutil

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    runs = {}
    for devices in (1, 2):
        work = tmp_path / f"devices{devices}"
        (work / "configs").mkdir(parents=True)
        shutil.copy(repo / "configs" / "toy.yaml", work / "configs" / "toy.yaml")
        (work / "models").symlink_to(repo / "models")
        done = _train_py(
            [
                "fit",
                "--config",
                "configs/toy.yaml",
                "--trainer.max_epochs=1",
                f"--trainer.devices={devices}",
                "--trainer.enable_progress_bar=false",
            ],
            work,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[devices] = work / "runs" / "toy"
    assert not (runs[2] / "red" / "version_1").exists()  # one log folder, written by rank 0
    selections = [
        json.loads((r / "red" / "version_0" / "selected" / "selection.json").read_text()) for r in runs.values()
    ]
    assert selections[0] == selections[1]  # every state's probe and validation counts, and the choice
    assert sum(s["probe_flagged"] for s in selections[0]["scores"]) > 0  # real detections, not zeros
    for name in ("red/version_0/selected", "erased"):
        one, two = (load_file(str(r / name / "rece_kv.safetensors")) for r in runs.values())
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), name
    assert len(list((runs[2] / "red" / "version_0" / "probes").rglob("*.png"))) == len(
        list((runs[1] / "red" / "version_0" / "probes").rglob("*.png"))
    )


def test_a_rece_fit_on_several_devices_gets_the_replicated_strategy():
    from lightning.pytorch.strategies import StrategyRegistry

    from rece_lightning.distributed import STRATEGY_NAME, ReplicatedDDPStrategy
    from train import _several

    assert StrategyRegistry[STRATEGY_NAME]["strategy"] is ReplicatedDDPStrategy
    assert [_several(d) for d in (1, "1", 2, "2", [0, 1], "0,1", "auto", -1, [3])] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]
    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    cli = cli_main(["--config", str(config), "--trainer.devices=2"], run=False)
    assert isinstance(cli.trainer.strategy, ReplicatedDDPStrategy)


def test_a_checkpoint_of_another_run_is_refused_and_nothing_is_written(
    tiny_pipeline_dir, tmp_path, monkeypatch, capsys
):
    """Lightning's CLI would take the checkpoint's hyper-parameters over the config's: the run would become the other
    run, logging into and exporting over its folders."""
    import lightning.pytorch as pl

    from tests.conftest import fit_tiny
    from train import main

    root = tmp_path / "other"
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    fit_tiny(tiny_pipeline_dir, root, max_epochs=1, callbacks=[checkpointing], erase_concepts=["nudity"])
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    args = ["fit", "--config", str(config), f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--model.erase_concepts=[a cat]", f"--ckpt_path={root / 'ckpt' / 'epoch=0.ckpt'}"])
    assert stopped.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "belongs to another run: its " in error[0], error
    assert "erase_concepts=['nudity'] (config: ['a cat'])" in error[0], error
    assert not (tmp_path / "runs").exists()  # nothing of this config was written
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written  # nor of the other run


def test_the_selector_and_its_detector_are_reachable_from_the_command_line(monkeypatch):
    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    cli = cli_main(
        [
            "--config",
            str(config),
            "--model.erase_concepts=[blue]",
            "--selector.init_args.scorer.init_args.classes=[blue]",
            "--selector.init_args.stop_when_clean=false",
        ],
        run=False,
    )
    from callbacks import ConceptCheckpointSelector

    selectors = [c for c in cli.trainer.callbacks if isinstance(c, ConceptCheckpointSelector)]
    assert len(selectors) == 1 and selectors[0].scorer.classes == ("blue",) and not selectors[0].stop_when_clean
    without = cli_main(["--config", str(config), "--selector=null"], run=False)
    assert not [c for c in without.trainer.callbacks if isinstance(c, ConceptCheckpointSelector)]


def test_an_uncached_hub_model_offline_stops_in_one_line(monkeypatch, tmp_path, capsys):
    from train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "rece.yaml"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config), "--selector=null", "--trainer.callbacks=[]"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'CompVis/stable-diffusion-v1-4' is not in the Hugging Face cache" in errors[0]
    assert "Traceback" not in stderr


def test_max_steps_alone_is_accepted_by_the_command_line_as_the_number_of_rounds(tiny_pipeline_dir, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            f"--model.pretrained_model_name_or_path={tiny_pipeline_dir}",
            f"--model.export_dir={tmp_path / 'erased'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--selector=null",
            "--trainer.max_epochs=null",
            "--trainer.max_steps=2",
        ]
    )
    assert cli.model.rece_epochs_done == 2 and (tmp_path / "erased" / "rece_kv.safetensors").is_file()
