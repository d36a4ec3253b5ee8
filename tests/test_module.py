"""RECEModule under a real Lightning Trainer on the tiny pipeline."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from rece_lightning import RECEModule, closed_form, diffusion, families, testing
from rece_lightning.methods import RECE
from rece_lightning.tokens import select_tokens
from tests.conftest import fit_tiny, with_method


def _reference_rece(pipeline_dir, epochs, concept="nudity", guide=" ", lamb=0.1, scale=1.0, keep=0.1, reg=0.1):
    """Algorithm 1 the slow way, per matrix in float64: UCE on token slices, then derive (Eq. 8) / erase (Eq. 3)."""
    pipeline = diffusion.load_pipeline(str(pipeline_dir))
    originals = [w.detach().double() for w in diffusion.kv_weights(pipeline.unet).values()]
    encoded_concept, encoded_guide = families.encode_prompts(pipeline, [concept, guide])
    c, g = encoded_concept.embedding.double(), encoded_guide.embedding.double()
    source, target = select_tokens(c, encoded_concept.length, g, encoded_guide.length, "last_word_onward")
    current = closed_form.erase_closed_form(
        originals, [source], [target], [g], lamb=lamb, erase_scale=scale, preserve_scale=keep
    )
    for _ in range(epochs):
        derived = closed_form.derive_embedding(current, originals, c, reg=reg)
        current = closed_form.erase_closed_form(
            current, [derived], [g], [g], lamb=lamb, erase_scale=scale, preserve_scale=keep
        )
    return current


def test_fit_runs_uce_then_one_derive_erase_round_per_epoch(tiny_pipeline_dir, tmp_path):
    trainer, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=3)
    assert int(module.edits_applied) == 4 and module.rece_epochs_done == 3
    assert trainer.global_step == 3  # each epoch's closed-form update counts as its step
    assert all(not p.requires_grad for p in module.pipeline.unet.parameters())
    reference = _reference_rece(tiny_pipeline_dir, epochs=3)
    for ours, theirs in zip(module.kv_state().values(), reference, strict=True):
        assert (ours.double() - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    # Only K/V changed: every other U-Net weight is the original one.
    fresh = diffusion.load_pipeline(str(tiny_pipeline_dir)).unet.state_dict()
    kv_names = set(module.kv_state())
    for name, value in module.pipeline.unet.state_dict().items():
        if name not in kv_names:
            assert torch.equal(value, fresh[name]), name
        else:
            assert not torch.equal(value, fresh[name]), name


def test_zero_epochs_is_the_uce_edit_alone(tiny_pipeline_dir, tmp_path):
    _, module = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=0)
    assert int(module.edits_applied) == 1
    reference = _reference_rece(tiny_pipeline_dir, epochs=0)
    for ours, theirs in zip(module.kv_state().values(), reference, strict=True):
        assert (ours.double() - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_several_concepts_with_their_own_guides_and_preserves(tiny_pipeline_dir, tmp_path):
    _, module = fit_tiny(
        tiny_pipeline_dir,
        tmp_path,
        max_epochs=1,
        erase_concepts=["Van Gogh", "Pablo Picasso"],
        guide_concepts=["art", "painting"],
        preserve_concepts=["Rembrandt", "Claude Monet"],
        reg=1e-3,
    )
    derived = module.derived_embeddings()
    assert set(derived) == {"Van Gogh", "Pablo Picasso"}
    assert all(d.shape == (77, 32) for d in derived.values())
    # Preserved prompts keep their K/V outputs nearly unchanged, erased ones move.
    original = dict(zip(module.kv_state(), [w for w in module.original_kv.values()], strict=True))
    kept, erased = (e.embedding for e in module.encoded(["Rembrandt", "Van Gogh"]))

    def drift(rows):
        return sum(
            ((w - original[n]) @ rows.T).norm() / (original[n] @ rows.T).norm() for n, w in module.kv_state().items()
        )

    assert drift(kept) < drift(erased)


def test_checkpoint_holds_the_transform_not_the_unet_and_resume_is_exact(tiny_pipeline_dir, tmp_path):
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    _, uninterrupted = fit_tiny(tiny_pipeline_dir, tmp_path / "a", max_epochs=3, callbacks=[every_epoch])
    first = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(first, weights_only=False)["state_dict"]
    assert set(state) == {"transform", "hessian", "edits_applied"}
    assert first.stat().st_size < 100_000  # d = 32 here; 9.4 MB for SD 1.x (two 768 x 768 float64 matrices)

    _, resumed = fit_tiny(
        tiny_pipeline_dir, tmp_path / "b", max_epochs=3, callbacks=[pl.callbacks.ModelCheckpoint()], ckpt_path=first
    )
    assert int(resumed.edits_applied) == int(uninterrupted.edits_applied) == 4
    for name, weight in uninterrupted.kv_state().items():
        assert torch.equal(resumed.kv_state()[name], weight), name


def test_non_finite_update_stops_the_run_and_exports_nothing(tiny_pipeline_dir, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=2, erase_scale=1e308)
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"erase_concepts": []}, r"erase_concepts=\[\]"),
        ({"erase_concepts": ["nudity", "  "]}, r"erase_concepts\[1\]='  '"),
        ({"erase_concepts": [""]}, r"erase_concepts\[0\]=''"),
        ({"preserve_concepts": [" "]}, r"preserve_concepts\[0\]=' '"),
        ({"erase_concepts": ["a", "b", "c"], "guide_concepts": ["x", "y"]}, "guide_concepts has 2 entries"),
        ({"lamb": 0}, "lamb=0 "),
        ({"lamb": float("inf")}, "lamb=inf"),
        ({"reg": -0.1}, "reg=-0.1"),
        ({"reg": float("nan")}, "reg=nan"),
        ({"erase_scale": -1.0}, "erase_scale=-1.0"),
        ({"preserve_scale": -0.1}, "preserve_scale=-0.1"),
        ({"uce_lamb": 0.0}, "uce_lamb=0.0"),
        ({"erase_concepts": ["nudity", "nudity"]}, r"erase_concepts lists \['nudity'\] more than once"),
        ({"preserve_concepts": ["a cat", "a cat"]}, r"preserve_concepts lists \['a cat'\] more than once"),
        ({"uce_preserve_scale": float("nan")}, "uce_preserve_scale=nan"),
        ({"uce_tokens": "first_word"}, "uce_tokens='first_word'"),
        ({"rece_tokens": "some"}, "rece_tokens='some'"),
        ({"dtype": "float8"}, "dtype='float8'"),
    ],
)
def test_bad_configuration_is_refused_with_the_value_and_what_is_allowed(tiny_pipeline_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RECEModule(pretrained_model_name_or_path=str(tiny_pipeline_dir), **with_method(kwargs))


def test_missing_local_model_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        RECEModule(pretrained_model_name_or_path=str(tmp_path / "does-not-exist"))


def test_over_long_concept_and_negative_epochs_are_refused_before_the_models_load(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded for a bad input")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match="tokens long"):
        fit_tiny(tiny_pipeline_dir, tmp_path, erase_concepts=["nudity " * 80])
    with pytest.raises(ValueError, match="max_epochs=-1"):
        fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=-1)


def test_more_rounds_than_the_paper_would_ever_use_get_a_warning_with_the_reason():
    with pytest.warns(Warning, match=r"max_epochs=60: the paper uses 1-10"):
        RECEModule._check_rounds(60, -1)
    RECEModule._check_rounds(10, -1)  # silent
    RECEModule._check_rounds(None, 4)  # max_steps counts rounds too (one closed-form step per epoch)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_pipelines_are_erased_with_float64_solves(tiny_pipeline_dir, dtype):
    """fp16/bf16 weights in, the same erasure as in float32 out, rounded once into the model's dtype."""
    reference = RECEModule(str(tiny_pipeline_dir))
    reference.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir)))
    reference.erase(2)
    module = RECEModule(str(tiny_pipeline_dir), dtype=dtype)
    module.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir), dtype=diffusion.resolve_dtype(dtype)))
    module.erase(2)
    assert module.transform.dtype == torch.float64
    eps = torch.finfo(diffusion.resolve_dtype(dtype)).eps
    for name, weight in module.kv_state().items():
        assert weight.dtype == diffusion.resolve_dtype(dtype)
        expected = reference.kv_state()[name].double()
        # The inputs were rounded to half precision before the solve; the answer may move by a few eps.
        assert (weight.double() - expected).abs().max() <= 50 * eps * expected.abs().max(), name


def test_erase_without_a_trainer_matches_the_lightning_fit(tiny_pipeline_dir, tmp_path):
    _, fitted = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=2)
    module = RECEModule(str(tiny_pipeline_dir))
    module.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir)))
    module.erase(2)
    assert int(module.edits_applied) == 3
    for name, weight in fitted.kv_state().items():
        assert torch.equal(module.kv_state()[name], weight), name


def test_concepts_are_configured_once_on_the_model(tiny_pipeline_dir, tmp_path):
    """A ConceptDataModule has no list of its own: fitted beside the module, it yields the module's concepts."""
    from rece_lightning.data import ConceptDataModule

    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch)

    module = RECEModule(str(tiny_pipeline_dir), erase_concepts=["nudity", "a cat"], guide_concepts=" ", export_dir=None)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=ConceptDataModule())
    assert [batch.erase for batch in seen] == [("nudity", "a cat")]
    with pytest.raises(TypeError):
        ConceptDataModule(erase_concepts=["nudity"])


def test_the_uce_stage_takes_its_own_lambda_and_preserve_scale(tiny_pipeline_dir):
    """The authors' train_uce.py: λ 0.5 and preserve scale 1.0 for UCE; the epochs keep 0.1 / 0.1."""
    from tests.test_closed_form import _lstsq_edit

    module = RECEModule(
        str(tiny_pipeline_dir),
        preserve_concepts=["a photo of a cat"],
        method=RECE(uce_lamb=0.5, uce_preserve_scale=1.0),
    )
    module.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir)))
    module.apply_uce()
    concept, guide = module.encoded(["nudity", " "])
    source, target = select_tokens(concept.embedding, concept.length, guide.embedding, guide.length, "last_word_onward")
    preserved = [e.embedding for e in module.encoded([" ", "a photo of a cat"])]
    edited = module.kv_state()
    for name, original in module.original_kv.items():
        expected = _lstsq_edit(original, [source], [target], preserved, 0.5, 1.0, 1.0)
        assert torch.allclose(edited[name].double(), expected, rtol=1e-4, atol=1e-6), name
        shared = _lstsq_edit(original, [source], [target], preserved, 0.1, 1.0, 0.1)
        assert not torch.allclose(edited[name].double(), shared, rtol=1e-4, atol=1e-6)  # the options took effect
    assert module.manifest()["hyperparameters"]["uce_lamb"] == 0.5


def test_a_fit_says_where_its_logs_checkpoints_and_export_go(tiny_pipeline_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        trainer, module = fit_tiny(
            tiny_pipeline_dir, tmp_path, max_epochs=1, callbacks=[pl.callbacks.ModelCheckpoint()]
        )
    announced = next(
        r.getMessage() for r in caplog.records if "derive-erase rounds after the UCE edit" in r.getMessage()
    )
    assert trainer.log_dir in announced and str(module.export_folder()) in announced
    assert trainer.checkpoint_callback.dirpath in announced


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_half_precision_is_refused_before_it_casts_the_float64_state(
    tiny_pipeline_dir, precision, monkeypatch, tmp_path
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline must not be loaded")

    monkeypatch.setattr(diffusion, "load_pipeline", no_loading)
    module = RECEModule(str(tiny_pipeline_dir), export_dir=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=f"trainer.precision='{precision}' is not allowed.*--model.dtype=float16"):
        trainer.fit(module)


def _bare_trainer(root, **options) -> pl.Trainer:
    """A Trainer that writes nothing and shows nothing."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=root,
        **options,
    )


def test_mixed_precision_leaves_the_float64_state_alone(tiny_pipeline_dir, tmp_path):
    _, plain = fit_tiny(tiny_pipeline_dir, tmp_path / "plain", max_epochs=1, export_dir=None)
    module = RECEModule(str(tiny_pipeline_dir), export_dir=None)
    _bare_trainer(tmp_path, precision="bf16-mixed", max_epochs=1).fit(module)
    assert module.transform.dtype == torch.float64
    assert torch.equal(module.transform, plain.transform)


@pytest.fixture(scope="module")
def wide_pipeline_dir(tmp_path_factory):
    """A tiny SD-1.x pipeline whose text width (64) exceeds its token positions (16), as in Stable Diffusion (d = 768,
    77 rows): its edits take the thin rank-T branches, the low-rank K/V write and the thin Eq. 8 solve."""
    from tests.conftest import CLIP_TOKENIZER

    tokenizer = CLIP_TOKENIZER if (CLIP_TOKENIZER / "vocab.json").is_file() else None
    folder = tmp_path_factory.mktemp("wide") / "wide-sd"
    return testing.build_tiny_pipeline(folder, tokenizer=tokenizer, max_length=16, text_width=64)


class _EveryState(pl.Callback):
    """The K/V after UCE and after every epoch."""

    def __init__(self) -> None:
        self.states = []

    def on_train_start(self, trainer, pl_module):
        self.states.append({n: w.detach().double().clone() for n, w in pl_module.kv_state().items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.on_train_start(trainer, pl_module)


def test_the_low_rank_write_is_the_dense_product_to_float32_resolution(wide_pipeline_dir):
    """The K/V written through the (compacted) low-rank factors equal ``W_orig @ transform`` computed in float64,
    to a few float32 roundings of the weights' scale."""
    module = RECEModule(pretrained_model_name_or_path=str(wide_pipeline_dir))
    module.attach_pipeline(diffusion.load_pipeline(str(wide_pipeline_dir)))
    module.erase(1)
    assert module._current_factors()[0] is not None  # UCE + 1 round: rank < d / 2, so the write took the factors
    for name, weight in module.kv_state().items():
        exact = module.original_kv[name].double() @ module.transform
        assert weight.dtype == torch.float32
        assert (weight.double() - exact).abs().max() <= 1e-6 * exact.abs().max(), name


@pytest.mark.slow  # a long end-to-end run: the full suite and CI run it
def test_the_thin_branches_match_the_per_matrix_reference_at_non_default_settings(
    wide_pipeline_dir, tmp_path, monkeypatch
):
    solves, writes = [], []
    real_solve, real_apply = closed_form._spd_solve, closed_form.apply_transform

    def solve(matrix, rhs, factor=None):
        solves.append(tuple(rhs.shape))
        return real_solve(matrix, rhs, factor)

    def apply(weight, transform, left=None, right=None, out=None):
        writes.append(left is not None)
        return real_apply(weight, transform, left, right, out=out)

    monkeypatch.setattr(closed_form, "_spd_solve", solve)
    monkeypatch.setattr(closed_form, "apply_transform", apply)
    watch = _EveryState()
    settings = {"lamb": 0.3, "preserve_scale": 0.25, "reg": 0.05}
    fit_tiny(wide_pipeline_dir, tmp_path, max_epochs=2, callbacks=[watch], **settings)
    monkeypatch.undo()
    # Every solve of the fit had fewer right-hand sides than d = 64 (thin Eq. 3, a k x k system of its k < d token
    # rows, and thin Eq. 8; the dense ones solve with d columns), and the K/V were written through the low-rank
    # factors at least once (after UCE).
    assert solves and all(rows <= 64 and columns < 64 for rows, columns in solves), solves
    assert any(writes)
    for epochs, state in enumerate(watch.states):
        reference = _reference_rece(wide_pipeline_dir, epochs, lamb=0.3, keep=0.25, reg=0.05)
        defaults = _reference_rece(wide_pipeline_dir, epochs)
        for ours, theirs, default in zip(state.values(), reference, defaults, strict=True):
            scale = theirs.abs().max()
            assert (ours - theirs).abs().max() <= 1e-5 * scale, epochs
            # the settings reached this state: the defaults give other weights, far beyond the tolerance
            assert (default - theirs).abs().max() > 1e-3 * scale, epochs


def test_max_steps_alone_counts_rounds(tiny_pipeline_dir, tmp_path):
    module = RECEModule(pretrained_model_name_or_path=str(tiny_pipeline_dir))
    _bare_trainer(tmp_path, max_steps=2).fit(module)
    assert module.rece_epochs_done == 2


def test_load_from_checkpoint_gives_the_weights_load_erased_gives(tiny_pipeline_dir, tmp_path):
    from rece_lightning import load_erased

    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    _, fitted = fit_tiny(tiny_pipeline_dir, tmp_path, max_epochs=2, callbacks=[checkpointing], reg=0.05)
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    restored = RECEModule.load_from_checkpoint(path)
    assert restored.method.reg == 0.05 and int(restored.edits_applied) == 2
    restored.setup("test")  # loads the base model named in the checkpoint and writes the restored state into it
    expected = diffusion.kv_weights(load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), path).unet)
    assert not all(torch.equal(w, fitted.original_kv[n]) for n, w in expected.items())
    for name, weight in restored.kv_state().items():
        assert torch.equal(weight, expected[name]), name
    # on another base of the same shapes the restored state is refused, not written
    other = testing.build_tiny_pipeline(tmp_path / "other", seed=1)
    again = RECEModule.load_from_checkpoint(path)
    with pytest.raises(ValueError, match="the checkpoint was made from other base weights"):
        again.attach_pipeline(diffusion.load_pipeline(str(other)))


def test_a_regulariser_that_makes_the_edit_nothing_is_refused_and_an_empty_edit_warns(tiny_pipeline_dir):
    with pytest.raises(ValueError, match=r"lamb=1e\+30 is not allowed: .* <= 1e\+06"):
        RECEModule(pretrained_model_name_or_path=str(tiny_pipeline_dir), method=RECE(lamb=1e30))
    with pytest.raises(ValueError, match=r"reg=10000000.0 is not allowed"):
        RECEModule(pretrained_model_name_or_path=str(tiny_pipeline_dir), method=RECE(reg=1e7))
    module = RECEModule(pretrained_model_name_or_path=str(tiny_pipeline_dir), method=RECE(erase_scale=0.0))
    module.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir)))
    with pytest.warns(UserWarning, match="numerically nothing"):
        module.apply_uce()


def test_low_rank_factors_survive_a_checkpoint_and_a_resume_writes_the_same_bits(wide_pipeline_dir, tmp_path):
    from rece_lightning.module import LOW_RANK_KEY

    watch = _EveryState()
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    fit_tiny(wide_pipeline_dir, tmp_path / "a", max_epochs=2, callbacks=[watch, every_epoch])
    first = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(first, weights_only=True)[LOW_RANK_KEY]  # UCE + 1 epoch: rank ~30 < d / 2 = 32
    assert saved["edits"] == 2 and saved["left"].shape[0] == 64 and saved["left"].shape[1] < 32
    # Resumed at its end (nothing left to run), the K/V written from the checkpoint are those of the uninterrupted
    # run after epoch 0 to the bit: W + (W L) R^T rounds differently from the dense W M.
    _, resumed = fit_tiny(wide_pipeline_dir, tmp_path / "b", max_epochs=1, ckpt_path=first)
    for name, weight in resumed.kv_state().items():
        assert torch.equal(weight.double(), watch.states[1][name]), name
