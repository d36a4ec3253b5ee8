"""What the methods beyond RECE cost, on SD-1.4 or SDXL shapes with random weights: RECE, RECE-NS (hard
preservation of ``--preserved`` prompts), RECE-P (the same, c' projected out: ``rece_p``), RECE-ADV (the vocabulary
attack in the loop) and RECE-ADV with the prompt search in the loop (``rece_search``: ``--population`` x
(``--generations`` + 1) prompts encoded per round), timed in one run.

    python benchmarks/bench_beyond.py --reps 3      # SD-1.4 shapes, 1 concept, 5 epochs: about 5 min on 2 CPU cores
    python benchmarks/bench_beyond.py --methods rece rece_search --epochs 1 --reps 1 --population 16 --generations 4

Prints JSON: per method the warm erasure (G and encodings cached, as in a sweep; ``min`` / ``median`` seconds over
``--reps``), the first (cold) erasure of each method after RECE's (the new encodings: the preserved prompts, the
attack's candidate words), and the ratios to RECE's warm erasure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_erase import CLIP_TOKENIZER, build_shaped_pipeline  # noqa: E402

from rece_lightning import RECEModule, diffusion  # noqa: E402
from rece_lightning.methods import RECE, AdversarialRECE, HardPreservation, NullSpaceRECE, ProjectionRECE  # noqa: E402

PRESERVED = (
    "a photo of a person",
    "a portrait of a woman",
    "a man in a suit",
    "a child playing in a park",
    "a couple at the beach",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd14", "sdxl"], default="sd14")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=4, help="words the in-loop attack erases per round")
    parser.add_argument("--candidates", type=int, default=256, help="vocabulary words the attack searches")
    parser.add_argument("--population", type=int, default=64, help="rece_search: prompts per generation")
    parser.add_argument("--generations", type=int, default=20, help="rece_search: generations per round")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["rece", "rece_ns", "rece_p", "rece_adv", "rece_search"],
        default=["rece", "rece_ns", "rece_adv"],
    )
    parser.add_argument("--tokenizer", type=Path, default=CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None)
    args = parser.parse_args()
    for name in ("reps", "epochs", "budget", "candidates", "generations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: it must be >= 1")
    if args.population < 4:
        parser.error(f"--population={args.population}: it must be >= 4")
    if "rece" not in args.methods:
        parser.error(f"--methods={args.methods}: include rece, the yardstick of the ratios")
    pipeline = build_shaped_pipeline(args.model, "cpu", torch.float32, args.tokenizer)
    originals = {n: w.detach().clone() for n, w in diffusion.kv_weights(pipeline.unet).items()}
    methods = {
        "rece": (lambda: RECE(), None),
        "rece_ns": (lambda: NullSpaceRECE(hard_preservation=HardPreservation()), list(PRESERVED)),
        "rece_p": (lambda: ProjectionRECE(hard_preservation=HardPreservation()), list(PRESERVED)),
        "rece_adv": (lambda: AdversarialRECE(attack_budget=args.budget, candidates=args.candidates), None),
        "rece_search": (
            lambda: AdversarialRECE(
                attack="prompt_search",
                attack_budget=args.budget,
                candidates=args.candidates,
                population=args.population,
                generations=args.generations,
            ),
            None,
        ),
    }
    methods = {name: methods[name] for name in args.methods}

    def erase(make, preserve) -> float:
        diffusion.write_kv_weights(pipeline.unet, originals)
        module = RECEModule(
            f"random/{args.model}-shaped", erase_concepts=["nudity"], preserve_concepts=preserve, method=make()
        )
        started = time.perf_counter()
        module.attach_pipeline(pipeline)
        module.erase(args.epochs)
        return time.perf_counter() - started

    report: dict = {"model": f"{args.model}-shaped", "epochs": args.epochs, "threads": torch.get_num_threads()}
    if "rece_search" in methods:
        report["search"] = {"population": args.population, "generations": args.generations, "budget": args.budget}
    for name, (make, preserve) in methods.items():
        first = erase(make, preserve)
        warm = [erase(make, preserve) for _ in range(args.reps)]
        report[name] = {
            "first": round(first, 3),
            "warm_min": round(min(warm), 3),
            "warm_median": round(statistics.median(warm), 3),
        }
        print(name, report[name], file=sys.stderr, flush=True)
    for name in methods.keys() - {"rece"}:
        report[f"{name}_over_rece_warm"] = round(report[name]["warm_min"] / report["rece"]["warm_min"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
