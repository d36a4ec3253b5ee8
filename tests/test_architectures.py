"""Beyond SD 1.x: tiny SD-2.x- and SDXL-shaped pipelines end to end, the pipeline class read from the folder, the
diffusers export, the base-model cache and many concepts at once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from callbacks import NudityCheckpointSelector, ProbeImages
from callbacks.probing import ProbeSettings, generate_probes
from rece_lightning import RECEModule, base_cache, closed_form, diffusion, families, load_erased, testing
from rece_lightning.data import PromptDataModule
from rece_lightning.evaluation import ErasureEvaluator
from rece_lightning.export import MANIFEST_NAME, WEIGHTS_NAME
from rece_lightning.methods import RECE
from rece_lightning.tokens import select_tokens
from tests.conftest import CLIP_TOKENIZER, fit_tiny

PROBE = ProbeSettings(num_images=1, num_inference_steps=2, height=32, width=32)
TOKENIZER = CLIP_TOKENIZER if (CLIP_TOKENIZER / "vocab.json").is_file() else None


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def arch_pipeline_dir(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    return request.param, testing.build_tiny_pipeline(folder, tokenizer=TOKENIZER, architecture=request.param)


@pytest.fixture(scope="module")
def arch_fit(arch_pipeline_dir, tmp_path_factory):
    architecture, folder = arch_pipeline_dir
    root = tmp_path_factory.mktemp(f"fit-{architecture}")
    callbacks = [ProbeImages(probe=PROBE), NudityCheckpointSelector(probe=PROBE)]
    trainer, module = fit_tiny(folder, root, max_epochs=2, callbacks=callbacks)
    return architecture, folder, trainer, module


def test_tiny_pipelines_have_their_architecture_after_from_pretrained(arch_pipeline_dir):
    architecture, folder = arch_pipeline_dir
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = diffusion.load_pipeline(str(folder))
    kv = diffusion.kv_weights(pipeline.unet)
    encoded = families.encode_prompts(pipeline, ["nudity"])[0]
    if architecture == "sdxl":
        assert index["_class_name"] == "StableDiffusionXLPipeline" and (families.family_of(pipeline).name == "sdxl")
        # d = both encoders' widths, concatenated, as the pipeline's own encode_prompt gives it
        width = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
        assert encoded.pooled is not None and encoded.pooled.shape == (pipeline.text_encoder_2.config.projection_dim,)
        reference = pipeline.encode_prompt("nudity", do_classifier_free_guidance=False)
        torch.testing.assert_close(encoded.embedding, reference[0][0])
        torch.testing.assert_close(encoded.pooled, reference[2][0])
    else:
        assert index["_class_name"] == "StableDiffusionPipeline" and not (families.family_of(pipeline).name == "sdxl")
        assert pipeline.scheduler.config.prediction_type == "v_prediction"
        width = pipeline.text_encoder.config.hidden_size
        assert encoded.pooled is None
    assert encoded.embedding.shape == (77, width)
    assert all(w.shape[1] == width for w in kv.values()) and len(kv) >= 14


def test_fit_export_and_load_erased(arch_fit, tmp_path):
    architecture, folder, trainer, module = arch_fit
    assert module.rece_epochs_done == 2
    export = Path(trainer.log_dir) / "erased"
    assert (export / WEIGHTS_NAME).is_file()
    selection = json.loads((Path(trainer.log_dir) / "selected" / "selection.json").read_text())
    assert len(selection["scores"]) == 3  # NudeNet scored the probes of every state; one of them was exported
    # The run's main export is the state the selector recommends (state 0: NudeNet finds nothing on a random model);
    # the last state goes beside it.
    assert module.recommended.state == selection["state"] == 0
    recommended = module.weights_for(module.recommended.transform)
    fresh = load_erased(diffusion.load_pipeline(str(folder)), export)
    for name, weight in diffusion.kv_weights(fresh.unet).items():
        assert torch.equal(weight, recommended[name])
    erased = module.kv_state()
    last = load_erased(diffusion.load_pipeline(str(folder)), Path(trainer.log_dir) / "erased_last")
    for name, weight in diffusion.kv_weights(last.unet).items():
        assert torch.equal(weight, erased[name])
    original = module.original_kv
    assert max(float((erased[n] - original[n]).abs().max()) for n in erased) > 1e-4  # it did erase something
    # The whole pipeline as a diffusers folder, loadable without project code.
    import diffusers

    pipeline_export = module.export(tmp_path / "pipeline", export_format="diffusers")
    plain = diffusers.DiffusionPipeline.from_pretrained(str(pipeline_export))
    assert type(plain).__name__ == type(module.pipeline).__name__
    for name, weight in diffusion.kv_weights(plain.unet).items():
        assert torch.equal(weight, erased[name])
    assert json.loads((pipeline_export / MANIFEST_NAME).read_text())["format"] == "diffusers"
    again = load_erased(diffusion.load_pipeline(str(folder)), pipeline_export)  # load_erased reads it too
    assert all(torch.equal(w, erased[n]) for n, w in diffusion.kv_weights(again.unet).items())


def test_probes_are_logged_for_every_state(arch_fit):
    _, _, trainer, _ = arch_fit
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0}).Reload()
    tags = [t for t in events.Tags()["images"] if "derived" in t]
    assert tags and len(events.Images(tags[0])) == 3  # after UCE, after epoch 1, after epoch 2


def test_one_prompt_evaluation(arch_fit, tmp_path):
    architecture, folder, trainer, _ = arch_fit
    csv = tmp_path / "prompts.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n0,a photo of nudity,7,5.0\n")
    evaluator = ErasureEvaluator(
        str(folder),
        erased=str(Path(trainer.log_dir) / "erased"),
        metrics=["nudity"],
        output_dir=str(tmp_path / "eval"),
        num_inference_steps=2,
        scheduler="model",
        height=32,
        width=32,
    )
    tester = pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False
    )
    tester.test(evaluator, datamodule=PromptDataModule(str(csv), batch_size=1))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    for variant in ("original", "erased"):
        assert results[variant]["num_prompts"] == 1 and results[variant]["num_images"] == 1
        assert len(list(Path(results[variant]["image_dir"]).glob("*.png"))) == 1


def test_sdxl_probe_of_c_prime_equals_the_concept_probe_on_the_unedited_model(tmp_path):
    """The probe passes the concept's own pooled embedding with c': on the unedited model c' -> c as reg -> 0."""
    folder = testing.build_tiny_pipeline(tmp_path / "xl", tokenizer=TOKENIZER, architecture="sdxl")
    module = RECEModule(str(folder), erase_concepts=["nudity"], method=RECE(reg=1e-9), export_dir=None)
    module.attach_pipeline(diffusion.load_pipeline(str(folder)))
    probes = generate_probes(module, PROBE)  # state: nothing edited
    derived, concept = module.derived_embeddings()["nudity"], module.encoded(["nudity"])[0].embedding
    assert (derived - concept.double()).abs().max() < 1e-5 * concept.abs().max()
    np.testing.assert_allclose(probes.derived["nudity"], probes.prompt["nudity"], atol=1e-4)
    # Without a pooled embedding an SDXL pipeline cannot generate from embeddings: said, not guessed.
    with pytest.raises(ValueError, match="pooled"):
        families.family_of(module.pipeline).embedding_inputs(module.pipeline, concept[None])


@pytest.mark.parametrize(
    "class_name,reason",
    [
        ("StableDiffusion3Pipeline", "no cross-attention key/value"),
        ("FluxPipeline", "no cross-attention key/value"),
        ("KandinskyV22Pipeline", "not supported"),
        # cross-attention DiTs do read the text through attn2: not "no cross-attention", but not supported yet
        ("LuminaPipeline", "not supported yet: its transformer's attn2 is a cross-attention"),
        ("SanaPipeline", "not supported yet"),
        ("HunyuanDiTPipeline", "not supported yet"),
    ],
)
def test_unsupported_pipeline_classes_are_refused_before_loading(class_name, reason, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for construct in (
        lambda: RECEModule(str(folder)),
        lambda: ErasureEvaluator(str(folder), original_only=True),
    ):
        with pytest.raises(ValueError, match=rf"{class_name}.*{reason}") as caught:
            construct()
        assert "StableDiffusionXLPipeline" in str(caught.value)  # says what is supported


def test_diffusers_export_refuses_a_folder_with_other_files_before_fit(tiny_pipeline_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        RECEModule(str(tiny_pipeline_dir), export_dir=str(busy), export_format="diffusers")
    with pytest.raises(ValueError, match="export_format='onnx'"):
        RECEModule(str(tiny_pipeline_dir), export_format="onnx")
    assert (busy / "notes.txt").read_text() == "mine"


def test_gram_and_encodings_are_reused_from_memory_and_from_disk(tiny_pipeline_dir, tmp_path, monkeypatch):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    calls = []
    real_encode = families.StableDiffusion.encode
    monkeypatch.setattr(
        families.StableDiffusion,
        "encode",
        lambda self, p, texts: calls.append(list(texts)) or real_encode(self, p, texts),
    )
    cache = tmp_path / "cache"

    def erased(reg: float) -> tuple[RECEModule, dict]:
        module = RECEModule(
            str(tiny_pipeline_dir), erase_concepts=["nudity"], method=RECE(reg=reg), cache_dir=str(cache)
        )
        module.attach_pipeline(pipeline)
        module.erase(2)
        weights = {n: w.clone() for n, w in module.kv_state().items()}
        diffusion.write_kv_weights(pipeline.unet, module.original_kv)  # back to the base model for the next run
        return module, weights

    base_cache.clear_memory()
    cold, cold_weights = erased(0.1)
    assert cold.base_cache.hits["gram"] == "computed" and sum(calls, []) == ["nudity", " "]
    encoder_calls = len(calls)
    warm, warm_weights = erased(0.1)
    assert warm.base_cache.hits["gram"] == "memory" and len(calls) == encoder_calls
    base_cache.clear_memory()  # a new process: only the disk is left
    from_disk, disk_weights = erased(0.1)
    assert from_disk.base_cache.hits == {"gram": "disk", "encodings": 2} and len(calls) == encoder_calls
    for weights in (warm_weights, disk_weights):
        assert all(torch.equal(weights[n], cold_weights[n]) for n in cold_weights)
    torch.testing.assert_close(from_disk.gram, closed_form.gram_matrix(list(cold.original_kv.values())), rtol=0, atol=0)
    # Another base model (different K/V) never sees these entries.
    other = {n: w + 1 for n, w in cold.original_kv.items()}
    assert base_cache.BaseModelCache(other, cache).key != cold.base_cache.key


def test_a_second_erasure_of_the_same_base_writes_the_parameters_in_place_and_keeps_the_base(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    base = {n: w.detach().clone() for n, w in diffusion.kv_weights(pipeline).items()}

    def erased(concept: str) -> tuple[RECEModule, dict, dict]:
        module = RECEModule(str(tiny_pipeline_dir), erase_concepts=[concept])
        module.attach_pipeline(pipeline)
        storage = {n: w.data_ptr() for n, w in module.kv_state().items()}
        module.erase(2)
        return module, storage, {n: w.clone() for n, w in module.kv_state().items()}

    base_cache.clear_memory()
    first, first_storage, first_weights = erased("nudity")
    moved = {n for n, w in first.kv_state().items() if w.data_ptr() != first_storage[n]}
    assert moved == set(base)  # the first module gives the parameters storage of their own: the base is kept apart
    diffusion.write_kv_weights(pipeline.unet, base)
    second, second_storage, second_weights = erased("violence")
    assert all(w.data_ptr() == second_storage[n] for n, w in second.kv_state().items())  # written in place
    assert all(second.original_kv[n] is first.original_kv[n] for n in base)  # the copy the first module kept
    assert all(torch.equal(second.original_kv[n], base[n]) for n in base)  # ... which no write touched
    # The same erasure as a new process (nothing in memory) gets, bit for bit.
    base_cache.clear_memory()
    diffusion.write_kv_weights(pipeline.unet, base)
    fresh, _, fresh_weights = erased("violence")
    assert fresh.original_kv[next(iter(base))] is not first.original_kv[next(iter(base))]
    assert all(torch.equal(fresh_weights[n], second_weights[n]) for n in base)
    assert not all(torch.equal(first_weights[n], second_weights[n]) for n in base)
    # Edited weights (another K/V fingerprint) never take the kept base.
    third = RECEModule(str(tiny_pipeline_dir), erase_concepts=["nudity"])
    third.attach_pipeline(pipeline)
    assert all(torch.equal(third.original_kv[n], fresh_weights[n]) for n in base)
    # A kept copy that shares storage with the live weights (written next) or differs in dtype is never handed out.
    cache = base_cache.BaseModelCache(base)
    cache.keep_base_weights(base)
    assert cache.base_weights(base) is None and cache.base_weights({n: w.clone() for n, w in base.items()}) == base
    assert base_cache.BaseModelCache({n: w.double() for n, w in base.items()}).base_weights(base) is None


def test_the_cache_key_sees_one_changed_value_a_dtype_or_a_name_but_not_the_order():
    generator = torch.Generator().manual_seed(3)
    weights = {
        f"block{i}.attn2.to_{kv}.weight": torch.randn(40, 32, generator=generator) for i in range(3) for kv in "kv"
    }
    key = base_cache.kv_fingerprint(weights)
    assert base_cache.kv_fingerprint(dict(reversed(list(weights.items())))) == key
    nudged = {n: w.clone() for n, w in weights.items()}
    nudged["block2.attn2.to_v.weight"][39, 31] = torch.nextafter(
        nudged["block2.attn2.to_v.weight"][39, 31], torch.tensor(9.0)
    )
    renamed = {n.replace("block0", "block9"): w for n, w in weights.items()}
    as_double = {n: w.double() for n, w in weights.items()}
    assert len({key, *(base_cache.kv_fingerprint(w) for w in (nudged, renamed, as_double))}) == 4


def test_many_concepts_at_once_match_the_per_matrix_solve(tiny_pipeline_dir):
    """40 concepts: 40 x 77 rows >> d = 32, so the edits take the dense d x d path; duplicated guides enter once."""
    concepts = [f"concept number {i}" for i in range(40)]
    module = RECEModule(str(tiny_pipeline_dir), erase_concepts=concepts, guide_concepts=" ", dtype="float64")
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir), dtype=torch.float64)
    module.attach_pipeline(pipeline)
    module.erase(2)
    fast = module.kv_state()
    # The same algorithm matrix by matrix, every guide row listed once per concept (the reference code's preserve set).
    names = list(module.original_kv)
    current = [module.original_kv[n] for n in names]
    encoded = {e: module.encoded([e])[0] for e in [*concepts, " "]}
    guide = encoded[" "]
    pairs = [
        select_tokens(encoded[c].embedding, encoded[c].length, guide.embedding, guide.length, "last_word_onward")
        for c in concepts
    ]
    preserve = [guide.embedding] * len(concepts)
    current = closed_form.erase_closed_form(current, [s for s, _ in pairs], [t for _, t in pairs], preserve)
    for _ in range(2):
        derived = [
            closed_form.derive_embedding(current, [module.original_kv[n] for n in names], encoded[c].embedding)
            for c in concepts
        ]
        current = closed_form.erase_closed_form(current, derived, [guide.embedding] * len(concepts), preserve)
    for name, weight in zip(names, current, strict=True):
        assert (fast[name] - weight).abs().max() <= 1e-8 * weight.abs().max()
    assert sum(source.shape[0] for source, _ in pairs) > fast[names[0]].shape[1]  # the rows really exceed d


def test_attacks_on_sdxl_are_refused_before_loading(arch_pipeline_dir):
    from rece_lightning.attacks import DerivedEmbeddingAttack

    architecture, folder = arch_pipeline_dir
    make = lambda: ErasureEvaluator(  # noqa: E731
        str(folder), original_only=True, metrics=["asr"], attack=DerivedEmbeddingAttack(concept="nudity")
    )
    if architecture == "sdxl":
        with pytest.raises(ValueError, match="SDXL"):
            make()
    else:
        assert make().attack is not None
