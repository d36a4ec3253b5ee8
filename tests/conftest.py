"""Shared fixtures: one tiny random Stable Diffusion pipeline per test session, saved and loaded like a real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLIP_TOKENIZER = SHARED / "clip-tokenizer"
DATASETS = SHARED / "datasets"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models on a busy 2-core machine run 5-60x slower with 2 threads than with 1 (shared/NOTES.md).
    torch.set_num_threads(1)


def clip_tokenizer_or_skip() -> Path:
    if not (CLIP_TOKENIZER / "vocab.json").is_file():
        pytest.skip("../shared/clip-tokenizer is absent")
    return CLIP_TOKENIZER


def datasets_or_skip() -> Path:
    if not DATASETS.is_dir():
        pytest.skip("../shared/datasets is absent")
    return DATASETS


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny SD-1.x-shaped pipeline with the real CLIP tokenizer when ../shared has it (else a trained BPE)."""
    from rece_lightning.testing import build_tiny_pipeline

    tokenizer = CLIP_TOKENIZER if (CLIP_TOKENIZER / "vocab.json").is_file() else None
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", tokenizer=tokenizer)


@pytest.fixture
def tiny_pipeline_copy(tiny_pipeline_dir, tmp_path) -> Path:
    """A private copy of the tiny pipeline folder, for tests that write next to it."""
    return Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "tiny-sd"))


def with_method(kwargs: dict) -> dict:
    """RECEModule keyword arguments with RECE's own options (``reg=...``) gathered into ``method=RECE(...)``."""
    import inspect

    from rece_lightning.methods import RECE

    own = set(inspect.signature(RECE.__init__).parameters) - {"self"}  # RECE's options, as it declares them
    options = {k: kwargs[k] for k in own if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in own}
    return {**rest, "method": RECE(**options)} if options else rest


def fit_tiny(pipeline_dir: Path, root: Path, *, max_epochs: int = 2, callbacks=None, ckpt_path=None, **module_kwargs):
    """Run a real Lightning fit of RECEModule on the tiny pipeline; returns (trainer, module)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from rece_lightning import RECEModule

    module = RECEModule(pretrained_model_name_or_path=str(pipeline_dir), **with_method(module_kwargs))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="rece"),
        callbacks=callbacks or [],
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


TOY_MODEL = Path(__file__).resolve().parents[1] / "models" / "toyworld-sd"


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    """The shipped toy text-to-image model (``python -m rece_lightning.toyworld.training`` makes it)."""
    assert (TOY_MODEL / "model_index.json").is_file(), f"the shipped toy model is missing from {TOY_MODEL}"
    return TOY_MODEL


@pytest.fixture(scope="session")
def toy_pipeline(toy_model_dir):
    """The toy model loaded once per session; tests that edit its K/V restore them."""
    from rece_lightning.diffusion import load_pipeline

    return load_pipeline(str(toy_model_dir))


@pytest.fixture(scope="session")
def unedited_export(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """An export of the tiny pipeline's own K/V weights: a valid erased model that erased nothing (fast to make)."""
    from rece_lightning import diffusion
    from rece_lightning.export import save_erased

    folder = tmp_path_factory.mktemp("unedited") / "export"
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    save_erased(folder, diffusion.kv_weights(pipeline.unet), {"method": "none", "base_model": str(tiny_pipeline_dir)})
    return folder


@pytest.fixture(scope="session")
def unedited_toy_export(toy_pipeline, tmp_path_factory) -> Path:
    """An export of the shipped toy model's own K/V weights (for configs whose base model is the toy model)."""
    from rece_lightning import diffusion
    from rece_lightning.export import save_erased

    folder = tmp_path_factory.mktemp("unedited_toy") / "export"
    save_erased(folder, diffusion.kv_weights(toy_pipeline.unet), {"method": "none", "base_model": "toyworld-sd"})
    return folder


def prompt_frame(case_numbers, seeds=None):
    """A selected prompt set as ``read_prompt_csv`` returns it: prompt ``p<case>`` per case number."""
    import pandas as pd

    cases = list(case_numbers)
    return pd.DataFrame(
        {
            "prompt": [f"p{c}" for c in cases],
            "case_number": cases,
            "seed": list(seeds) if seeds is not None else list(range(len(cases))),
            "guidance": 7.5,
            "categories": "",
            "artist": "",
            "height": None,
            "width": None,
        }
    )
