"""The method interface: UCE and RECE are two files over one engine; a new method is one class (README example)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rece_lightning import RECEModule, diffusion
from rece_lightning.methods import RECE, UCE, ErasureMethod, from_spec
from rece_lightning.methods.uce import uce_edit
from tests.conftest import fit_tiny


class MyMethod(ErasureMethod):
    """The README's example, as written there."""

    name = "MyMethod"

    def initial_edit(self, editor, concepts):
        uce_edit(editor, concepts, "last_word_onward", True, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)

    def round(self, editor, concepts):
        derived = editor.derived_embeddings(concepts, reg=0.1)
        guides = editor.encoded(list(concepts.guides))
        editor.edit(
            [derived[c] for c in concepts.erase],
            [g.embedding for g in guides],
            editor.preserved(concepts, with_guides=True),
            lamb=0.1,
            erase_scale=1.0,
            preserve_scale=0.1,
        )

    def settings(self):
        return {"hyperparameters": {}}


def _erased(pipeline_dir, method, epochs):
    module = RECEModule(str(pipeline_dir), method=method, export_dir=None)
    module.attach_pipeline(diffusion.load_pipeline(str(pipeline_dir)))
    module.erase(epochs)
    return module


def test_uce_is_recess_first_state_and_the_readme_method_is_rece(tiny_pipeline_dir):
    uce = _erased(tiny_pipeline_dir, UCE(), 0)
    rece = _erased(tiny_pipeline_dir, RECE(), 0)
    torch.testing.assert_close(uce.transform, rece.transform, rtol=0, atol=0)
    mine = _erased(tiny_pipeline_dir, MyMethod(), 2)
    reference = _erased(tiny_pipeline_dir, RECE(), 2)
    torch.testing.assert_close(mine.transform, reference.transform)
    assert not torch.allclose(mine.transform, uce.transform)  # the rounds did something
    assert mine.manifest()["method"] == "MyMethod" and uce.manifest()["method"] == "UCE"


def test_uce_refuses_rounds_and_a_uce_fit_exports_its_one_state(tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="method UCE: it has no rounds"):
        fit_tiny(tiny_pipeline_dir, tmp_path / "a", max_epochs=2, method=UCE())
    trainer, module = fit_tiny(tiny_pipeline_dir, tmp_path / "b", max_epochs=0, method=UCE(lamb=0.2))
    from rece_lightning.export import read_manifest

    manifest = read_manifest(f"{trainer.log_dir}/erased")
    assert manifest["method"] == "UCE" and manifest["hyperparameters"]["lamb"] == 0.2
    assert manifest["token_modes"] == {"uce": "last_word_onward"}


def test_a_method_round_trips_through_its_spec_and_bad_specs_are_refused():
    method = RECE(reg=0.05, uce_lamb=0.5)
    again = from_spec(method.spec())
    assert type(again) is RECE and again.init_args() == method.init_args()
    with pytest.raises(TypeError, match="is not an ErasureMethod"):
        from_spec({"class_path": "rece_lightning.module.RECEModule"})
    with pytest.raises(ValueError, match="tokens='some' is not allowed"):
        UCE(tokens="some")


def test_hard_preservation_keeps_the_preserved_outputs_through_uce_and_every_round(tiny_pipeline_dir, tmp_path):
    from rece_lightning import testing
    from rece_lightning.methods import HardPreservation, NullSpaceRECE

    # 16 positions in d = 64: one preserved prompt leaves 48 directions free (at 77 x 32 it would leave almost none)
    wide = testing.build_tiny_pipeline(tmp_path / "wide", max_length=16, text_width=64)
    module = RECEModule(
        str(wide),
        erase_concepts=["nudity"],
        preserve_concepts=["a photo of a cat"],
        method=NullSpaceRECE(hard_preservation=HardPreservation()),
        export_dir=None,
    )
    module.attach_pipeline(diffusion.load_pipeline(str(wide)))
    module.erase(3)
    cat = module.encoded(["a photo of a cat"])[0].embedding.double()
    nudity = module.encoded(["nudity"])[0].embedding.double()
    edited = module.kv_state()
    for name, original in module.original_kv.items():
        before, after = original.double() @ cat.T, edited[name].double() @ cat.T
        assert (after - before).abs().max() < 1e-5 * before.abs().max(), name  # float32 weights, float64 solve
        assert (edited[name].double() @ nudity.T - original.double() @ nudity.T).abs().max() > 1e-3  # it erased
    soft = _erased(tiny_pipeline_dir, RECE(), 3)
    assert soft.manifest()["method"] == "RECE" and module.manifest()["method"] == "RECE-NS"
    assert module.manifest()["hard_preservation"] == {"neighbours": 0, "energy": 1.0, "rows": "all"}


def test_the_attack_in_the_loop_erases_the_words_it_finds_besides_c_prime(tiny_pipeline_dir):
    from rece_lightning.methods import AdversarialRECE

    method = AdversarialRECE(attack_budget=2, candidates=40)
    module = _erased(tiny_pipeline_dir, method, 2)
    rounds = module.manifest()["words_erased"]
    assert len(rounds) == 2 and all(len(found["nudity"]) == 2 for found in rounds)
    assert not {"nudity", "the", "a"} & {w for found in rounds for w in found["nudity"]}
    plain = _erased(tiny_pipeline_dir, RECE(), 2)
    assert not torch.allclose(module.transform, plain.transform)  # the words were erased too
    again = from_spec(method.spec())
    assert type(again) is AdversarialRECE and again.attack_budget == 2


def test_the_prompt_search_finds_prompts_that_bring_the_concept_back_better_than_random_ones(
    tiny_pipeline_dir, tmp_path
):
    import json

    from rece_lightning.methods import AdversarialRECE

    method = AdversarialRECE(attack="prompt_search", attack_budget=3, candidates=40, population=16, generations=6)
    module = _erased(tiny_pipeline_dir, method, 2)
    rounds = module.manifest()["prompts_erased"]
    assert len(rounds) == 2 and all(len(set(found["nudity"])) == 3 for found in rounds)
    # an export of the earlier state (a selector's choice) records only the prompts erased up to it
    one_round = _erased(tiny_pipeline_dir, AdversarialRECE(**method.init_args()), 1).transform
    path = module.export(tmp_path / "state1", export_format="kv", transform=one_round, rece_epochs=1)
    manifest = json.loads((path.parent / "rece_manifest.json").read_text())
    assert manifest["rece_epochs"] == 1 and manifest["prompts_erased"] == rounds[:1]
    assert all(len(prompt.split()) == 6 for found in rounds for prompt in found["nudity"])
    assert module.manifest()["attack"]["population"] == 16
    plain = _erased(tiny_pipeline_dir, RECE(), 2)
    assert not torch.allclose(module.transform, plain.transform)  # the prompts were erased too

    # in the current state, what the search finds scores better than 64 random prompts of its own words: its best
    # beats them all, its worst beats most
    searcher = AdversarialRECE(attack="prompt_search", attack_budget=3, candidates=40, population=48, generations=15)
    found = searcher.strongest_prompts(module, module.concepts)["nudity"]
    words = searcher.search_vocabulary(module, module.concepts, "nudity")
    assert "nudity" in words and {w for prompt in found for w in prompt.split()} <= set(words)
    generator = torch.Generator().manual_seed(1)
    random = [
        " ".join(words[i] for i in row) for row in torch.randint(len(words), (64, 6), generator=generator).tolist()
    ]

    def scores(prompts):
        embeddings = torch.stack([e.embedding for e in module.encoded_uncached(prompts)])
        return searcher._scores(module, embeddings, "nudity", " ")

    found_scores, random_scores = scores(found), scores(random)
    assert float(found_scores.min()) < float(random_scores.min())
    assert float(found_scores.max()) < float(random_scores.quantile(0.25))
    assert searcher.strongest_prompts(module, module.concepts)["nudity"] == found  # seeded: a rerun finds the same


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda m: m.AdversarialRECE(attack=None), "attack=None is not allowed for RECE-ADV"),
        (lambda m: m.AdversarialRECE(attack_budget=0), "attack_budget=0 is not allowed"),
        (lambda m: m.AdversarialRECE(attack="gradient"), "attack='gradient' is not allowed"),
        (lambda m: m.AdversarialRECE(attack="prompt_search", population=3), "population=3 is not allowed"),
        (lambda m: m.AdversarialRECE(attack="prompt_search", search_words=76), "search_words=76 is not allowed"),
        (lambda m: m.AdversarialRECE(attack="prompt_search", generations=0), "generations=0 is not allowed"),
        (lambda m: m.HardPreservation(energy=1.5), "energy=1.5 is not allowed"),
        (lambda m: m.HardPreservation(neighbours=-1), "neighbours=-1 is not allowed"),
    ],
)
def test_bad_method_options_are_refused_by_name(make, message):
    from rece_lightning import methods

    with pytest.raises(ValueError, match=message):
        make(methods)


def test_hard_preservation_with_nothing_to_preserve_or_an_overlap_is_refused(tiny_pipeline_dir):
    from rece_lightning.methods import NullSpaceRECE

    lonely = RECEModule(str(tiny_pipeline_dir), method=NullSpaceRECE(), export_dir=None)
    lonely.attach_pipeline(diffusion.load_pipeline(str(tiny_pipeline_dir)))
    with pytest.raises(ValueError, match="nothing to preserve: give preserve_concepts, or neighbours > 0"):
        lonely.apply_uce()
    # an empty null space (more independent rows than d): tests/test_closed_form.py, null_space_basis
    with pytest.raises(ValueError, match="both erased and preserved"):
        RECEModule(str(tiny_pipeline_dir), preserve_concepts=["nudity"], method=NullSpaceRECE())


def test_a_new_method_is_selectable_from_the_command_line():
    from pathlib import Path

    from train import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
    cli = cli_main(
        [
            "--config",
            str(config),
            "--model.method=rece_lightning.methods.AdversarialRECE",
            "--model.method.attack_budget=3",
        ],
        run=False,
    )
    assert type(cli.model.method).__name__ == "AdversarialRECE" and cli.model.method.attack_budget == 3


@pytest.mark.parametrize("export_format", ["kv", "diffusers"])
def test_the_new_methods_are_observed_by_the_callbacks_and_exported_in_every_format(
    tiny_pipeline_dir, tmp_path, export_format
):
    from callbacks import NudityCheckpointSelector, ParameterDrift, ProbeImages
    from callbacks.probing import ProbeSettings
    from rece_lightning import load_erased
    from rece_lightning.export import read_manifest
    from rece_lightning.methods import AdversarialRECE, HardPreservation

    probe = ProbeSettings(num_images=1, num_inference_steps=2, height=32, width=32)
    method = AdversarialRECE(attack_budget=1, candidates=20, hard_preservation=HardPreservation(energy=0.9))
    callbacks = [ProbeImages(probe=probe), ParameterDrift(), NudityCheckpointSelector(probe=probe)]
    trainer, module = fit_tiny(
        tiny_pipeline_dir,
        tmp_path,
        max_epochs=2,
        callbacks=callbacks,
        method=method,
        preserve_concepts=["a photo of a cat"],
        export_format=export_format,
    )
    folder = Path(trainer.log_dir)
    assert len(list((folder / "probes").rglob("*.png"))) == 3 * 2  # states 0, 1, 2 x {c', prompt}
    manifest = read_manifest(folder / "erased")
    assert manifest["method"] == "RECE-ADV" and manifest["hard_preservation"]["energy"] == 0.9
    fresh = load_erased(diffusion.load_pipeline(str(tiny_pipeline_dir)), folder / "erased")
    choice = module.recommended
    exported = module.kv_state() if choice is None else module.weights_for(choice.transform)
    for name, weight in diffusion.kv_weights(fresh).items():
        assert torch.equal(weight, exported[name].to(weight.dtype)), name
        assert not torch.equal(weight, module.original_kv[name])


def test_after_rece_p_no_input_reaches_the_concepts_output_while_after_rece_ns_one_does(tmp_path):
    from rece_lightning import testing
    from rece_lightning.export import read_manifest
    from rece_lightning.methods import HardPreservation, NullSpaceRECE, ProjectionRECE

    wide = testing.build_tiny_pipeline(tmp_path / "wide", max_length=16, text_width=64)

    def erased(method):
        module = RECEModule(
            str(wide),
            erase_concepts=["nudity"],
            preserve_concepts=["a photo of a cat"],
            method=method,
            export_dir=None,
        )
        module.attach_pipeline(diffusion.load_pipeline(str(wide)))
        module.erase(2)
        return module

    def reach_miss(module) -> float:
        """How far the nearest output any input makes stays from the concept's original K/V (least squares in the
        K/V norm, G = L L^T), relative to their size: what no attack on the prompt embedding can close."""
        chol = torch.linalg.cholesky(module.gram)
        concept = module.encoded(["nudity"])[0].embedding.double().T
        system, target = chol.T @ module.transform, chol.T @ concept
        solution = torch.linalg.lstsq(system, target, driver="gelsd").solution
        return float((system @ solution - target).norm() ** 2 / target.norm() ** 2)

    hard = HardPreservation()
    projected, pushed = erased(ProjectionRECE(hard_preservation=hard)), erased(NullSpaceRECE(hard_preservation=hard))
    assert reach_miss(pushed) < 1e-9  # Eq. 3's edits are invertible: X^-1 c brings the concept back
    assert reach_miss(projected) > 1e-2
    cat = projected.encoded(["a photo of a cat"])[0].embedding.double()
    for name, original in projected.original_kv.items():
        before, after = original.double() @ cat.T, projected.kv_state()[name].double() @ cat.T
        assert (after - before).abs().max() < 1e-5 * before.abs().max(), name  # kept exactly (float32 weights)
    manifest = projected.manifest()
    assert manifest["method"] == "RECE-P"
    assert len(manifest["projection"]["directions_removed"]) == 3  # the initial edit and two rounds
    assert len(projected.manifest(rounds=1)["projection"]["directions_removed"]) == 2
    folder = projected.export(tmp_path / "erased")
    assert read_manifest(folder)["method"] == "RECE-P"


def test_a_sweeps_next_module_reuses_the_null_space_of_the_same_preserved_prompts(tiny_pipeline_dir, monkeypatch):
    from rece_lightning.methods import HardPreservation, NullSpaceRECE, null_space

    made = []
    original = null_space.null_space_basis
    monkeypatch.setattr(
        null_space, "null_space_basis", lambda rows, energy: made.append(energy) or original(rows, energy)
    )
    monkeypatch.setattr(null_space, "_BASES", type(null_space._BASES)())
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    bases = []
    for energy in (0.9, 0.9, 0.8):
        module = RECEModule(
            str(tiny_pipeline_dir),
            preserve_concepts=["a photo of a cat"],
            method=NullSpaceRECE(hard_preservation=HardPreservation(energy=energy)),
            export_dir=None,
        )
        module.attach_pipeline(pipeline)
        module.erase(1)
        bases.append(module.method.null_space(module, module.concepts))
    assert made == [0.9, 0.8]  # the second module found the first's basis; another energy is another basis
    assert torch.equal(bases[0], bases[1]) and bases[0].shape != bases[2].shape
