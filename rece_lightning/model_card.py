"""A Hugging Face model card (``README.md``) with every export, and the push of an export to the Hub.

The card is written through ``huggingface_hub.ModelCard`` from the export's manifest: front matter (base model, tags,
a license placeholder), what was erased towards what, the method's hyper-parameters, the state a selector chose and
why, how to load the export in its format, and the measured results once an evaluation of it has run (the evaluator
adds them, with the protocol they were measured under).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rece_lightning.export import MANIFEST_NAME
from rece_lightning.files import write_text

CARD_NAME = "README.md"
RESULTS_NAME = "rece_results.json"  # the evaluations of this export, by prompt set, that the card shows

__all__ = ["CARD_NAME", "add_results", "check_repo_id", "model_card", "push_to_hub", "write_model_card"]

_USAGE = {
    "kv": """```python
from diffusers import StableDiffusionPipeline  # the base model's pipeline class
from rece_lightning import load_erased

pipe = StableDiffusionPipeline.from_pretrained("{base}")
load_erased(pipe, "path/to/this/folder")  # writes the erased cross-attention K/V
```""",
    "diffusers": """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")  # a whole pipeline: no extra code
```""",
    "lora": """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors, strength 1
```

AUTOMATIC1111 / Forge / ComfyUI: copy `rece_lora_kohya.safetensors` into `models/Lora` and use it at strength 1
(`<lora:rece_lora_kohya:1>`) with the base model it was made from.""",
}


def check_repo_id(repo_id: str | None) -> str | None:
    """``repo_id`` if it is a Hub repository id (``user/name``); refuses anything else by name, before any work."""
    if repo_id is None:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"push_to_hub={repo_id!r} is not a Hub repository id ({error})") from None
    if "/" not in repo_id:
        raise ValueError(f"push_to_hub={repo_id!r} is not allowed: give 'user-or-org/name'")
    return repo_id


def _hyper_table(manifest: Mapping[str, Any]) -> str:
    settings = dict(manifest.get("hyperparameters") or {})
    for key in ("token_modes", "preserve_energy", "neighbours", "attack"):
        if key in manifest:
            settings[key] = manifest[key]
    if not settings:
        return "(none recorded)"
    rows = "\n".join(f"| `{key}` | `{json.dumps(value, default=str)}` |" for key, value in sorted(settings.items()))
    return "| setting | value |\n|---|---|\n" + rows


def model_card(manifest: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]] | None = None) -> ModelCard:
    """The card of an export described by ``manifest``; ``results``: prompt set -> ``{"table", "protocol"}``."""
    base = str(manifest.get("base_model", "the base model"))
    export_format = str(manifest.get("format", "kv"))
    method = str(manifest.get("method", "RECE"))
    concepts = list(manifest.get("erase_concepts") or [])
    guides = list(manifest.get("guide_concepts") or [])
    pairs = "\n".join(
        f"- `{concept}` → `{guides[i] if i < len(guides) else guides[0] if guides else ' '}`"
        for i, concept in enumerate(concepts)
    )
    preserved = ", ".join(f"`{p}`" for p in manifest.get("preserve_concepts") or []) or "none"
    data = ModelCardData(
        base_model=base if "/" in base and not os.path.isabs(base) else None,
        tags=[
            "text-to-image",
            "diffusers",
            "concept-erasure",
            "rece-lightning",
            method.lower(),
            *(["lora"] if export_format == "lora" else []),
        ],
        license="other",
        license_name="same-as-base-model",
        license_link="LICENSE",
        library_name="diffusers" if export_format in ("diffusers", "lora") else None,
        pipeline_tag="text-to-image",
    )
    selection = manifest.get("selection")
    lora = ""
    if export_format == "lora":
        lora = (
            f"\nLoRA rank {manifest.get('lora_rank')} of the edit's {manifest.get('lora_full_rank')}; relative K/V "
            f"error {float(manifest.get('lora_relative_error', 0)):.1e}.\n"
        )
    sections = [
        f"# {', '.join(concepts) or 'Concepts'} erased from {base}",
        f"Made with rece-lightning ({method}: closed-form edits "
        "of the cross-attention key/value projections only; every other weight is the base model's).\n\n"
        "**License**: replace `license: other` above with the base model's license (e.g. CreativeML OpenRAIL-M "
        "for Stable Diffusion 1.x); this edit inherits it.",
        f"## What was erased\n\n{pairs or '(none recorded)'}\n\nPreserved: {preserved}.",
        f"## How it was made\n\nMethod `{method}`, {manifest.get('rece_epochs', 0)} derive-erase rounds after the "
        f"initial edit, weights in `{manifest.get('dtype', '?')}`.\n\n{_hyper_table(manifest)}",
        "## Selected state\n\n"
        + (
            f"State {manifest.get('rece_epochs')}: {selection}."
            if selection
            else "The last state of the run (no selector chose another)."
        ),
        f"## How to use ({export_format})\n\n{_USAGE.get(export_format, '').format(base=base)}{lora}",
    ]
    if results:
        parts = []
        for name, entry in sorted(results.items()):
            protocol = entry.get("protocol")
            said = f"\n\nProtocol: {protocol}" if protocol else ""
            parts.append(f"### {name}\n\n{entry['table'].strip()}{said}")
        sections.append("## Measured results\n\n" + "\n\n".join(parts))
    else:
        sections.append(
            "## Measured results\n\nNone yet: `python train.py test --config configs/eval_i2p.yaml "
            "--model.erased <this folder>` adds them here."
        )
    sections.append(
        "## Limitations\n\nClosed-form erasure lowers, but does not remove, what red-team attacks can recover; check "
        "the results above and the project's README before relying on it."
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def _results(folder: Path) -> dict[str, Any]:
    path = folder / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def write_model_card(folder: str | os.PathLike) -> Path:
    """(Re)write ``folder/README.md`` from the export's manifest and the evaluations recorded beside it."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    card = model_card(manifest, _results(folder))
    path = folder / CARD_NAME
    write_text(path, str(card))
    return path


def add_results(folder: str | os.PathLike, name: str, table: str, protocol: str | None) -> Path:
    """Record an evaluation of the export in ``folder`` (prompt set ``name``: its Markdown table and protocol) and
    rewrite the card with it; an evaluation of the same prompt set replaces the earlier one."""
    folder = Path(folder)
    results = _results(folder)
    results[name] = {"table": table, "protocol": protocol}
    write_text(folder / RESULTS_NAME, json.dumps(results, indent=2, sort_keys=True))
    return write_model_card(folder)


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the export in ``folder`` (card included) to the Hub repository ``repo_id``; returns the commit URL.

    ``huggingface_hub``'s own upload (``create_repo`` + ``upload_folder``); the token comes from ``huggingface-cli
    login`` or ``HF_TOKEN`` unless given.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload concept-erased model (rece-lightning)",
        ignore_patterns=[".*"],
    )
    return str(getattr(commit, "commit_url", commit))
