"""Prompt sets from a local path or a Hugging Face dataset id, read through the real huggingface_hub cache offline."""

from __future__ import annotations

import pytest

from rece_lightning.data import PromptDataModule
from rece_lightning.prompt_sets import is_hub_id, resolve_prompt_csv

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the hub offline (HF_HUB_OFFLINE=1); ``add`` puts a dataset snapshot in it as a
    download would."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo_id: str, files: dict[str, str]) -> None:
        repo = cache / f"datasets--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        for name, text in files.items():
            path = repo / "snapshots" / COMMIT / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return add


def test_local_paths_and_dataset_ids_are_told_apart(tmp_path):
    assert is_hub_id("AIML-TUDA/i2p") and is_hub_id("AIML-TUDA/i2p/i2p_benchmark.csv")
    assert not is_hub_id("../shared/datasets/i2p.csv") and not is_hub_id("prompts/i2p.csv")
    assert not is_hub_id("/abs/i2p.csv") and not is_hub_id("i2p.csv")
    local = tmp_path / "p.csv"
    local.write_text("prompt\na\n")
    assert resolve_prompt_csv(str(local)) == local


def test_a_dataset_id_is_read_from_the_hugging_face_cache_offline(offline_hub):
    offline_hub("AIML-TUDA/i2p", {"i2p_benchmark.csv": "prompt,evaluation_seed,case_number\na cat,1,0\na dog,2,1\n"})
    data = PromptDataModule("AIML-TUDA/i2p")
    data.setup("test")
    assert list(data.frame["prompt"]) == ["a cat", "a dog"] and list(data.frame["seed"]) == [1, 2]
    named = PromptDataModule("AIML-TUDA/i2p/i2p_benchmark.csv", limit=1)
    assert named.num_prompts == 1


def test_a_repository_with_several_csvs_needs_the_file_named(offline_hub):
    offline_hub("org/sets", {"a.csv": "prompt\nx\n", "sub/b.csv": "prompt\ny\n"})
    with pytest.raises(
        ValueError, match=r"holds 2 CSV files \['a.csv', 'sub/b.csv'\]: name one as org/sets/<file.csv>"
    ):
        resolve_prompt_csv("org/sets")
    assert resolve_prompt_csv("org/sets/sub/b.csv").read_text() == "prompt\ny\n"


def test_a_set_that_cannot_be_had_says_where_to_get_it(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"prompts_csv='AIML-TUDA/i2p': .* HF_HUB_OFFLINE=1 reads the cache.*"):
        resolve_prompt_csv("AIML-TUDA/i2p")
    with pytest.raises(
        FileNotFoundError, match=r"'\.\./no-such-folder/nudity-ring-a-bell.csv' does not exist.*Ring-A-Bell"
    ):
        resolve_prompt_csv("../no-such-folder/nudity-ring-a-bell.csv")


@pytest.mark.parametrize(
    "rows,message",
    [
        ("0,a cat,1,nan", "evaluation_guidance=nan in selected row 0 .* must be a finite number"),
        ("0,a cat,abc,7.5", "evaluation_seed='abc' in selected row 0 .* must be a whole number"),
        ("0,a cat,1.5,7.5", "evaluation_seed=1.5 in selected row 0"),
        ("0,a cat,1,inf", "evaluation_guidance=inf"),
    ],
)
def test_bad_cells_are_refused_when_the_set_is_read_before_any_model_loads(tmp_path, rows, message):
    from rece_lightning.data import PromptDataModule, read_prompt_csv

    csv = tmp_path / "prompts.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n1,a dog,2,5.0\n" + rows + "\n")
    with pytest.raises(ValueError, match=message.replace("row 0", "row 1")):
        read_prompt_csv(str(csv))
    with pytest.raises(ValueError, match="prompts.csv"):
        PromptDataModule(str(csv)).setup("test")  # the data module reads it first in a test run
    assert read_prompt_csv(str(csv), limit=1)["seed"].tolist() == [2]  # only selected rows are checked
