"""Print the README's table of erasure figures from the JSON files ``bench_erase.py`` wrote.

python benchmarks/summarize_bench.py docs/bench_erase/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _seconds(value: float) -> str:
    """Seconds, or milliseconds below a second (a GPU's figures)."""
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def row(result: dict) -> str:
    model = "SD-1.4" if result["model"].startswith("sd14") else "SDXL"
    device = result.get("device", "cpu")
    cells = [
        f"{model} (d = {result['text_width']}, {result['kv_matrices']} K/V)",
        f"{device}, {result.get('dtype', 'float32')}",
        str(result["concepts"]),
        str(result["epochs"]),
        _seconds(result["erase"]["min"]),
        _seconds(result["erase_warm"]["min"]),
        _seconds(result["erase_warm_disk"]["min"]),
        _seconds(result["unet_step"]["min"]),
        f"{result['erase_over_unet_step']:.3f}",
        f"{result['erase_warm_over_unet_step']:.3f}",
        f"{result['erase_extra_memory_mb']:.0f}",
        f"{_seconds(result['straightforward']['min'])} ({result['straightforward_over_fast_warm']:.0f}×)"
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
    results.sort(key=lambda r: ("cpu" not in r.get("device", "cpu"), r["model"] != "sd14-shaped", r["concepts"]))
    print(
        "| shapes | device | N | epochs | cold | warm | warm (disk) | U-Net step | cold / step | warm / step "
        "| extra MB | straightforward s (÷ warm) | float64 vs per-matrix | per-matrix vs itself, 1e-15 jitter |"
    )
    print("|" + "---|" * 14)
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
