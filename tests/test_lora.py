"""LoRA export: plain diffusers (no project import) loads both layouts and reproduces the erased K/V; truncation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rece_lightning import RECEModule, closed_form
from rece_lightning.export import MANIFEST_NAME
from rece_lightning.lora import DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME, lora_layers
from tests.conftest import fit_tiny

# Run in a fresh interpreter that imports diffusers and torch only: what a user without this package has.
PLAIN_DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
base, lora, expected, *weight_names = sys.argv[1:]
pipe = StableDiffusionPipeline.from_pretrained(base)
for weight_name in weight_names:  # each layout on the same fresh base
    pipe.load_lora_weights(lora, weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    state = pipe.unet.state_dict()
    worst = 0.0
    for name, value in load_file(expected).items():
        got = state[name].double()
        worst = max(worst, float((got - value.double()).norm() / value.double().norm()))
    print("WORST", weight_name, worst)
    pipe = StableDiffusionPipeline.from_pretrained(base)
assert "rece_lightning" not in sys.modules
"""


@pytest.fixture(scope="module")
def lora_fit(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    trainer, module = fit_tiny(
        tiny_pipeline_dir, root, max_epochs=1, export_dir=str(root / "lora"), export_format="lora"
    )
    expected = root / "expected.safetensors"
    save_file({k: v.detach().contiguous() for k, v in module.kv_state().items()}, str(expected))
    return module, root / "lora", expected


def _relative_errors_in_plain_diffusers(base: Path, lora: Path, expected: Path, names: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS, str(base), str(lora), str(expected), *names],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("WORST")]
    return {name: float(error) for _, name, error in lines}


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_plain_diffusers_loads_the_lora_and_reproduces_the_erased_kv(lora_fit, tiny_pipeline_dir):
    module, folder, expected = lora_fit
    names = [DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME]
    errors = _relative_errors_in_plain_diffusers(tiny_pipeline_dir, folder, expected, names)
    assert set(errors) == set(names) and max(errors.values()) <= 1e-6
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format"] == "lora" and manifest["lora_rank"] == manifest["lora_full_rank"] > 0
    assert manifest["lora_relative_error"] <= 1e-6 and manifest["rece_epochs"] == 1


def test_kohya_keys_name_every_kv_module_of_the_unet(lora_fit):
    module, folder, _ = lora_fit
    # ComfyUI's and A1111's rule: the module path with "_" for "." after "lora_unet_"
    unet_modules = {"lora_unet_" + n.replace(".", "_"): n for n, _ in module.pipeline.unet.named_modules() if n}
    with safe_open(str(folder / KOHYA_LORA_NAME), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert {unet_modules[m] + ".weight" for m in modules} == set(module.kv_state())
    assert len(keys) == 3 * len(module.kv_state())  # lora_down, lora_up, alpha each
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"]


def test_truncated_lora_is_the_best_low_rank_edit(lora_fit):
    module, _, _ = lora_fit
    transform = module.transform.detach().cpu()
    full = lora_layers(module.original_kv, transform)
    one = lora_layers(module.original_kv, transform, rank=1)
    assert one.rank == 1 and full.rank == full.full_rank > 1
    assert full.relative_error <= 1e-6 < one.relative_error
    # independent check: the rank-1 edit is the leading singular pair of M - I (Eckart-Young)
    delta = transform.double() - torch.eye(transform.shape[0], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta)
    assert one.kept_energy == pytest.approx(float(s[0] ** 2 / (s[: full.rank] ** 2).sum()), rel=1e-9)
    name, weight = next(iter(module.original_kv.items()))
    down, up = one.layers[name]
    expected = weight.double() @ torch.outer(u[:, 0] * s[0], vh[0])
    assert torch.allclose((up.double() @ down.double()), expected, rtol=1e-5, atol=1e-6)


def test_low_rank_update_reconstructs_the_transform_exactly_at_full_rank():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(12, 3, dtype=torch.float64, generator=generator)
    right = torch.randn(12, 3, dtype=torch.float64, generator=generator)
    transform = torch.eye(12, dtype=torch.float64) + left @ right.T
    update = closed_form.low_rank_update(transform)
    assert update.rank == update.full_rank == 3 and update.kept_energy == 1.0
    assert torch.allclose(torch.eye(12, dtype=torch.float64) + update.up @ update.down, transform, atol=1e-12)
    assert closed_form.low_rank_update(transform, rank=8).rank == 3  # never more than the edit has


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "8", 10_000])
def test_bad_lora_rank_is_refused_before_the_model_loads(tiny_pipeline_dir, rank):
    with pytest.raises(ValueError, match=r"lora_rank=.* is not allowed: a LoRA rank is a whole number in \[1, d = "):
        RECEModule(str(tiny_pipeline_dir), export_format="lora", lora_rank=rank)


def test_loading_a_lora_folder_as_a_kv_export_says_how_to_apply_it(lora_fit):
    from rece_lightning.export import read_erased

    _, folder, _ = lora_fit
    with pytest.raises(ValueError, match=r"is a LoRA export: apply it with pipe.load_lora_weights"):
        read_erased(folder)


@pytest.mark.slow  # a tiny SDXL pipeline built, erased and loaded twice: about 10 s
def test_sdxl_loads_both_layouts_through_its_own_lora_loader(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from rece_lightning import diffusion, testing

    folder = testing.build_tiny_pipeline(tmp_path / "xl", architecture="sdxl")
    module = RECEModule(str(folder), export_format="lora", export_dir=str(tmp_path / "lora"))
    module.attach_pipeline(diffusion.load_pipeline(str(folder)))
    module.erase(1)
    module.export(tmp_path / "lora")
    for weight_name in (DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
        pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        state = pipe.unet.state_dict()
        for name, value in module.kv_state().items():
            assert float((state[name].double() - value.double()).norm() / value.double().norm()) <= 1e-6, name
    with safe_open(str(tmp_path / "lora" / KOHYA_LORA_NAME), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
