"""The method interface: UCE and RECE are two files over one engine; a new method is one class (README example)."""

from __future__ import annotations

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
