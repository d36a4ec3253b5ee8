"""Print the README's table of erasure figures from the JSON files ``bench_erase.py`` wrote.

python benchmarks/summarize_bench.py docs/bench_erase/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(result: dict) -> str:
    model = "SD-1.4" if result["model"].startswith("sd14") else "SDXL"
    cells = [
        f"{model} (d = {result['text_width']}, {result['kv_matrices']} K/V)",
        str(result["concepts"]),
        str(result["epochs"]),
        f"{result['erase']['min']:.2f}",
        f"{result['erase_warm']['min']:.2f}",
        f"{result['erase_warm_disk']['min']:.2f}",
        f"{result['unet_step']['min']:.1f}",
        f"{result['erase_over_unet_step']:.3f}",
        f"{result['erase_warm_over_unet_step']:.3f}",
        f"{result['erase_extra_memory_mb']:.0f}",
        f"{result['straightforward']['min']:.0f} ({result['straightforward_over_fast_warm']:.0f}×)"
        if "straightforward" in result
        else "—",
        f"{result['max_relative_difference_per_matrix_float64']:.1e}"
        if "max_relative_difference_per_matrix_float64" in result
        else "—",
        f"{result['reference_sensitivity_float64']:.1e}" if "reference_sensitivity_float64" in result else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    results = [json.loads(Path(path).read_text()) for path in sys.argv[1:]]
    results.sort(key=lambda r: (r["model"] != "sd14-shaped", r["concepts"], r["epochs"]))
    print(
        "| shapes | N | epochs | cold s | warm s | warm (disk) s | U-Net step s | cold / step | warm / step "
        "| extra MB | straightforward s (÷ warm) | float64 vs per-matrix | per-matrix vs itself, 1e-15 jitter |"
    )
    print("|" + "---|" * 13)
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
