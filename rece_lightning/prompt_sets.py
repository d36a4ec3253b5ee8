"""Where prompt sets come from: a local CSV, or a CSV in a Hugging Face dataset repository.

``prompts_csv`` (and a selector's ``validation_csv``) take either a local path or a dataset id: ``org/name`` (the
repository's only CSV) or ``org/name/path/in/repo.csv``, e.g. ``AIML-TUDA/i2p``. Hub files are downloaded once
through ``huggingface_hub`` into its cache (``HF_HOME``), and ``HF_HUB_OFFLINE=1`` reads that cache without any
network access. Prompt sets are never copied into this repository.

Resolution happens when a run needs the prompts (a data module's ``setup``, a callback's ``setup``), not when a
config is instantiated, so every config instantiates in a bare clone; a set that cannot be had then fails with a
message saying where to get it.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["KNOWN_SOURCES", "is_hub_id", "resolve_prompt_csv"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./ -]+\.csv)?$")

# Where the paper's prompt sets come from (for the message when one is missing).
KNOWN_SOURCES = {  # the first key found in the file name wins
    "ring-a-bell": "Ring-A-Bell (Tsai et al.): the Ring-A-Bell and RECE repositories (GitHub)",
    "i2p": "I2P (Schramowski et al.): the Hugging Face dataset AIML-TUDA/i2p",
    "nudity": "the 142 I2P nudity prompts of UnlearnDiff / P4D: the RECE and UnlearnDiff repositories (GitHub)",
    "artist": "the artist prompts of ESD / UCE: the UCE repository (GitHub, data/)",
    "coco": "COCO-30k captions: MS-COCO 2014 validation captions (cocodataset.org)",
    "validation": "the authors' validation prompts: the RECE repository (GitHub, data/)",
}


def is_hub_id(source: str) -> bool:
    """``org/name`` or ``org/name/file.csv`` that is not an existing or relative-looking local path (``dir/x.csv``
    is a local path: a dataset id names its repository before any file)."""
    if source.startswith((".", "/", "~")) or Path(source).exists() or not _HUB_ID.match(source):
        return False
    return not (source.count("/") == 1 and source.lower().endswith(".csv"))


def _where_to_get(source: str) -> str:
    name = Path(source).name.lower()
    hints = [text for key, text in KNOWN_SOURCES.items() if key in name]
    return hints[0] if hints else "a CSV with a 'prompt' column"


def resolve_prompt_csv(source: str, option: str = "prompts_csv") -> Path:
    """The local CSV file of ``source`` (a path, or a hub dataset id downloaded into the Hugging Face cache)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{option}={source!r} is not allowed: give a CSV path or a Hugging Face dataset id")
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not is_hub_id(source):
        raise FileNotFoundError(
            f"{option}={source!r} does not exist. Give a local CSV or a Hugging Face dataset id (e.g. AIML-TUDA/i2p); "
            f"this set is {_where_to_get(source)}"
        )
    return _from_hub(source, option)


def _from_hub(source: str, option: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import OfflineModeIsEnabled

    owner, name, *rest = source.split("/")
    repo_id, filename = f"{owner}/{name}", "/".join(rest) or None
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.csv", "**/*.csv"]))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise FileNotFoundError(
            f"{option}={source!r}: the Hugging Face dataset could not be had ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Download it once with network access (it is then "
            f"cached, and HF_HUB_OFFLINE=1 reads the cache), or give a local CSV; this set is {_where_to_get(source)}"
        ) from error
    csvs = sorted(p for p in folder.rglob("*.csv") if p.is_file())
    if len(csvs) != 1:
        found = [str(p.relative_to(folder)) for p in csvs]
        raise ValueError(f"{option}={source!r} holds {len(csvs)} CSV files {found}: name one as {repo_id}/<file.csv>")
    return csvs[0]
