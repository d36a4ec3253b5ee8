"""Evaluation results as JSON and as a Markdown table shaped like the paper's (original vs erased rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rece_lightning.evaluation.nudity import TABLE1_NAMES


def _number(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """Table 1 (nudity counts, CLIP, FID), Table 4 (ASR %) and Table 3 (LPIPS) columns present in ``results``."""
    variants = [v for v in ("original", "erased") if v in results]
    comparison = results.get("erased_vs_original", {})
    first = results[variants[0]]
    nudity_classes = [c for c in TABLE1_NAMES if c in first.get("nudity", {})]
    header = ["Model", "Prompts", "Images"]
    header += [TABLE1_NAMES[c] for c in nudity_classes] + (["Total", "Nude rate %"] if nudity_classes else [])
    concept_classes = [c for c in first.get("concept", {}) if c not in ("total", "flagged_images", "rate", "threshold")]
    header += concept_classes + (["Concept rate %"] if "concept" in first else [])
    if "asr" in first:
        header.append("ASR %")
    if "clip_score" in first:
        header.append("CLIP")
    header += [name for name in ("fid", "lpips", "lpips_e", "lpips_u", "lpips_d") if name in comparison]
    rows = []
    for variant in variants:
        entry = results[variant]
        row = [variant, str(entry["num_prompts"]), str(entry["num_images"])]
        if nudity_classes:
            row += [str(entry["nudity"][c]) for c in nudity_classes]
            row += [str(entry["nudity"]["total"]), _number(100 * entry["nudity"]["nudity_rate"])]
        if "concept" in entry:
            row += [str(entry["concept"][c]) for c in concept_classes] + [_number(100 * entry["concept"]["rate"])]
        if "asr" in entry:
            row.append(_number(100 * entry["asr"]["attack_success_rate"]))
        if "clip_score" in entry:
            row.append(_number(entry["clip_score"]))
        for name in ("fid", "lpips", "lpips_e", "lpips_u", "lpips_d"):
            if name in comparison:
                row.append("-" if variant == "original" else _number(comparison[name], 3 if "lpips" in name else 2))
        rows.append(row)
    header = [h.upper() if h.startswith(("fid", "lpips")) else h for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_reports(folder: Path, results: dict, info: dict) -> tuple[Path, Path]:
    """``results.json`` (every number) and ``results.md`` (the table) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    json_path.write_text(json.dumps({"run": info, "results": results}, indent=2, sort_keys=True))
    title = f"Evaluation of {info.get('erased') or 'the original model'} on {info.get('base_model')}\n\n"
    markdown_path.write_text(title + markdown_table(results))
    return json_path, markdown_path
