"""Evaluation results as JSON and as a Markdown table shaped like the paper's (original vs erased rows)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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
    """``results.json`` (every number) and ``results.md`` (the table) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    json_path.write_text(json.dumps({"run": info, "results": results}, indent=2, sort_keys=True, default=str))
    title = f"Evaluation of {info.get('erased') or 'the original model'} on {info.get('base_model')}\n\n"
    markdown_path.write_text(title + markdown_table(results, columns))
    return json_path, markdown_path
