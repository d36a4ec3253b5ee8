"""Evaluation results as JSON and as a Markdown table shaped like the paper's (original vs erased rows)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from rece_lightning.files import atomic_write

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


def write_reports(folder: Path, results: dict, info: dict, columns: Sequence[Column]) -> tuple[Path, Path]:
    """``results.json`` (every number) and ``results.md`` (the table) in ``folder``: the latest evaluation there.

    Every evaluation is also kept under ``folder/results/<prompt set>-<hash>.{json,md}``, the hash taken over what
    was evaluated (models, image-set fingerprints, prompt set and selection, metrics), so that evaluating a second
    prompt set into the same folder keeps the first one's results, and a rerun of the same one replaces its own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"run": info, "results": results}, indent=2, sort_keys=True, default=str)
    title = f"Evaluation of {info.get('erased') or 'the original model'} on {info.get('base_model')}\n\n"
    table = title + markdown_table(results, columns)
    identity = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
    stem = Path(str(info.get("prompts", {}).get("prompts_csv") or "prompts")).stem or "prompts"
    kept = folder / "results" / f"{stem}-{identity}"
    kept.parent.mkdir(exist_ok=True)
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    for path, content in ((kept.with_suffix(".json"), text), (kept.with_suffix(".md"), table)):
        atomic_write(path, lambda tmp, content=content: Path(tmp).write_text(content))
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(table))
    return json_path, markdown_path
