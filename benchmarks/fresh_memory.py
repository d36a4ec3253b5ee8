"""How much the first write of fresh memory costs on this machine, with and without a large resident set.

    python benchmarks/fresh_memory.py                        # ~20 s on 2 CPU cores
    python benchmarks/fresh_memory.py --hold-gb 12 --pause 3  # as the SDXL benchmark's cold runs find memory

Allocates ``--size-gb`` (SDXL's K/V in float32: 1.36 GB), fills it once (every page faulted in by torch's parallel
fill), frees it, waits ``--pause`` seconds and repeats. ``--hold-gb`` first fills that much and keeps it, as a process
holding an SDXL pipeline does. Prints one JSON line per repetition: wall seconds and the process's kernel (system) CPU
seconds of the fill.

Why it exists: ``bench_erase.py --model sdxl`` times the cold erasure's write of the new K/V into fresh storage at about
twice its warm time. On a virtual machine whose balloon driver reports free pages to the host (Linux free page
reporting: free blocks of 2 MB and more, about 2 s after they are freed), such pages are given back and the next touch
of each faults on the host as well as in the guest. This script shows whether that is the case here (the fills after
a pause stay slow while a large set is held) and how much of the cold write it explains.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.36, help="memory filled each repetition (GB)")
    parser.add_argument("--hold-gb", type=float, default=0.0, help="memory filled first and held throughout (GB)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between freeing and the next allocation")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args(argv)
    for name in ("size_gb", "reps"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be > 0")
    for name in ("hold_gb", "pause"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 0")
    held = torch.ones(int(args.hold_gb * 1e9 / 4)) if args.hold_gb else None
    elements = int(args.size_gb * 1e9 / 4)
    for rep in range(args.reps):
        before, started = os.times(), time.perf_counter()
        fresh = torch.empty(elements).fill_(1.0)
        seconds, after = time.perf_counter() - started, os.times()
        del fresh
        print(
            json.dumps(
                {
                    "rep": rep,
                    "size_gb": args.size_gb,
                    "hold_gb": args.hold_gb,
                    "pause_s": args.pause,
                    "fill_s": round(seconds, 3),
                    "system_cpu_s": round(after.system - before.system, 2),
                }
            ),
            flush=True,
        )
        time.sleep(args.pause)
    del held


if __name__ == "__main__":
    main()
