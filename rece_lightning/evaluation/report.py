"""The report stage: results as JSON and as a Markdown table shaped like the paper's (original vs erased rows), the
adversarial prompts of an attack as a prompt CSV, the flat figures the logger gets."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rece_lightning.evaluation.protocol import protocol_line
from rece_lightning.export import MANIFEST_NAME
from rece_lightning.files import write_text
from rece_lightning.model_card import add_results

Column = tuple[str, dict[str, str]]  # (header, {variant: cell}), as each metric's ``columns`` gives them


def markdown_table(results: dict, columns: Sequence[Column]) -> str:
    """One row per evaluated model: prompts, images, then the metrics' columns (Table 1 / 3 / 4 figures)."""
    variants = [v for v in ("original", "erased") if v in results]
    header = ["Model", "Prompts", "Images", *(name for name, _ in columns)]
    rows = [
        [variant, str(results[variant]["num_prompts"]), str(results[variant]["num_images"])]
        + [cells.get(variant, "-") for _, cells in columns]
        for variant in variants
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _prompt_set_name(info: dict) -> str:
    """The evaluated prompt set's file stem (``i2p`` for ``.../i2p.csv``): names kept results and card entries."""
    return Path(str(info.get("prompts", {}).get("prompts_csv") or "prompts")).stem or "prompts"


def write_reports(folder: Path, results: dict, info: dict, columns: Sequence[Column]) -> tuple[Path, Path]:
    """``results.json`` (every number) and ``results.md`` (the table) in ``folder``: the latest evaluation there.

    Every evaluation is also kept under ``folder/results/<prompt set>-<hash>.{json,md}``, the hash taken over what
    was evaluated (models, image-set fingerprints, prompt set and selection, metrics), so that evaluating a second
    prompt set into the same folder keeps the first one's results, and a rerun of the same one replaces its own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"run": info, "results": results}, indent=2, sort_keys=True, default=str)
    title = f"Evaluation of {info.get('erased') or 'the original model'} on {info.get('base_model')}\n\n"
    said = f"{protocol_line(info['protocol'])}\n\n" if info.get("protocol") else ""
    table = title + said + markdown_table(results, columns)
    identity = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
    stem = _prompt_set_name(info)
    kept = folder / "results" / f"{stem}-{identity}"
    kept.parent.mkdir(exist_ok=True)
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    for path, content in ((kept.with_suffix(".json"), text), (kept.with_suffix(".md"), table)):
        write_text(path, content)
    write_text(json_path, text)
    write_text(markdown_path, table)
    return json_path, markdown_path


def add_to_model_card(erased: str | None, results: dict, columns: Sequence[Column], info: dict) -> Path | None:
    """Add an evaluation of an export to its model card (:mod:`rece_lightning.model_card`), where ``erased`` is an
    export folder (or a file in one) that has a manifest; returns the card, or None."""
    if not erased:
        return None
    folder = Path(erased).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / MANIFEST_NAME).is_file():
        return None
    stem = _prompt_set_name(info)
    line = protocol_line(info["protocol"]) if info.get("protocol") else None
    return add_results(folder, stem, markdown_table(results, columns), line)


def write_adversarial_csv(folder: Path, datamodule, path: Path) -> None:
    """The attacked prompts as a prompt CSV (the paper's columns): each prompt's adversarial prompt, its seed and
    guidance; prompts whose attack gives only an embedding (the derived-embedding attack) keep their text. The text is
    the decoded tokens: the attack's images came from the ids, which a BPE tokenizer may not reproduce from it."""
    dataset = getattr(datamodule, "dataset", None) or []
    items = {item.case_number: item for item in dataset if item.index == 0}
    rows = {}  # this prompt set's outcomes only (another set in the same folder has other keys)
    for case, item in items.items():
        record_path = folder / f"{item.prompt_key}.json"
        if record_path.is_file():
            rows[case] = json.loads(record_path.read_text())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "original_prompt", "found"])
    for case, record in sorted(rows.items()):
        item = items.get(case)
        original = item.prompt if item is not None else ""
        writer.writerow(
            [
                case,
                record.get("adversarial_prompt") or original,
                item.seed if item is not None else "",
                item.guidance if item is not None else "",
                original,
                "" if record.get("found") is None else int(record["found"]),
            ]
        )
    write_text(path, buffer.getvalue())


def prompt_selection(datamodule) -> dict[str, Any]:
    """Which prompts were evaluated (the results of two prompt sets are kept apart by it)."""
    if datamodule is None or not hasattr(datamodule, "prompts_csv"):
        return {}
    return {
        "prompts_csv": datamodule.prompts_csv,
        **datamodule.selection,
        "images_per_prompt": datamodule.images_per_prompt,
    }


def flatten(results: dict, prefix: str = "test") -> dict[str, float]:
    flat = {}
    for key, value in results.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
