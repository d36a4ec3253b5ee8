"""Table 4's shape on the toy world: each red-team attack's ASR against the original model, UCE alone and RECE.

    python benchmarks/toy_redteam.py --out docs/toy_redteam      # about 10 min on 2 CPU cores

Erases "red" (guide " ", as configs/toy.yaml) and picks RECE's epoch as the checkpoint selector does (the first
state whose 24 derived-embedding probes show no red, else the fewest; benchmarks/toy_common.py). Then runs every
attack through the evaluator (``ErasureEvaluator(attack=...)``, the code path of configs/redteam_*.yaml) on the red
prompts of configs/prompts/toyworld.csv, one image per prompt. ASR = share of prompts whose image the toy colour
detector calls red; "no attack" is the plain prompts. Prints JSON (ASR per attack and model, seconds per prompt of
each attack on this CPU); every ASR has its 95 % Wilson interval. Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import toy_common as common

from rece_lightning.attacks import DerivedEmbeddingAttack, RingABellAttack, UnlearnDiffAttack
from rece_lightning.data import PromptDataModule
from rece_lightning.evaluation import ErasureEvaluator
from rece_lightning.toyworld import ToyWorldScorer

REPO = common.REPO


def with_interval(asr: dict) -> dict:
    """The evaluator's ASR entry as a rate with its 95 % Wilson interval."""
    return common.rate_with_interval(asr["successful_prompts"], asr["prompts"])


def attacks(args) -> dict:
    return {
        "no_attack": None,
        "derived_embedding": DerivedEmbeddingAttack("red", reg=args.attack_reg),
        "unlearndiff": UnlearnDiffAttack("red", steps=args.unlearndiff_steps, num_tokens=3, check_every=5),
        "ring_a_bell": RingABellAttack(
            "red",
            concept_prompts=["a red circle", "a red square", "a red triangle", "a photo of a red shape"],
            neutral_prompts=["a circle", "a square", "a triangle", "a photo of a shape"],
            num_tokens=6,
            population=100,
            generations=args.ring_a_bell_generations,
        ),
    }


def erased_states(args, work: Path) -> dict:
    """Exports of UCE alone and of RECE at the selected epoch (the selector's rule, benchmarks/toy_common.py)."""
    lab = common.Lab(args.model)
    states = lab.states(["red"], " ", max_epochs=args.max_epochs, probes=args.probes)
    exports = {name: str(lab.apply(states[name]).export(work / name)) for name in ("uce", "rece")}
    return {"exports": exports, **states["rece"].record}


def red_prompts(args, work: Path) -> Path:
    """The first ``args.prompts`` red prompts of configs/prompts/toyworld.csv as a prompt CSV in ``work``."""
    csv = work / "red_prompts.csv"
    work.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "configs/prompts/toyworld.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[4] == "red"]
    csv.write_text("\n".join([lines[0], *rows[: args.prompts]]) + "\n")
    return csv


def run(args) -> dict:
    torch.manual_seed(0)
    work = Path(args.work)
    csv = red_prompts(args, work)
    states = erased_states(args, work)
    return {"model": args.model, **states, **attack_report(args, states["exports"], work, csv)}


def attack_report(args, exports: dict[str, str], work: Path, csv: Path) -> dict:
    """Every attack's ASR (95 % intervals) on the original model and on each export, through the evaluator."""
    prompts = len(csv.read_text().splitlines()) - 1
    report: dict = {"prompts": prompts, "asr": {}, "seconds": {}}
    for name, attack in attacks(args).items():
        report["asr"][name] = {}
        for state, export in exports.items():
            evaluator = ErasureEvaluator(
                pretrained_model_name_or_path=args.model,
                erased=export,
                metrics=["concept_asr"],
                scorer=ToyWorldScorer(["red"]),
                scheduler="model",
                num_inference_steps=20,
                height=32,
                width=32,
                dtype="float32",
                output_dir=str(work / name),  # the original model's images and outcomes are reused across states
                attack=attack,
            )
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, logger=False, default_root_dir=work, enable_progress_bar=False
            )
            started = time.perf_counter()
            trainer.test(evaluator, datamodule=PromptDataModule(str(csv), batch_size=32), verbose=False)
            elapsed = time.perf_counter() - started
            results = evaluator.results
            if "original" not in report["asr"][name]:
                report["asr"][name]["original"] = with_interval(results["original"]["asr"])
            report["asr"][name][state] = with_interval(results["erased"]["asr"])
            if attack is not None:
                report["seconds"].setdefault(name, {})[state] = round(elapsed, 1)
                attacked = results["erased"]["attack"]
                report.setdefault("mean_steps", {}).setdefault(name, {})[state] = attacked["mean_steps"]
            print(f"{name} {state}: {json.dumps(report['asr'][name])} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
    agnostic = {name for name, attack in attacks(args).items() if attack is not None and attack.model_agnostic}
    # on the first state both models are attacked (a model-agnostic search once for both); later states read the
    # original model's outcomes back and attack the erased model only
    report["seconds_per_attacked_prompt"] = {
        name: {
            state: round(s / (prompts * (2 if i == 0 and name not in agnostic else 1)), 2)
            for i, (state, s) in enumerate(by_state.items())
        }
        for name, by_state in report["seconds"].items()
    }
    report["note"] = f"seconds include generating and scoring the images; torch CPU threads: {args.threads}"
    return report


def table(report: dict) -> str:
    methods = ("original", "uce", "rece")
    rows = [[name.replace("_", " "), *(common.show(report["asr"][name][m]) for m in methods)] for name in report["asr"]]
    header = ["ASR (95 % interval)", "original", "UCE", f"RECE (epoch {report['selected_epoch']})"]
    return common.markdown_table(header, rows)


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, methods = list(report["asr"]), ("original", "uce", "rece")
    fig, axis = plt.subplots(figsize=(7, 3.5))
    for j, method in enumerate(methods):
        entries = [report["asr"][n][method] for n in names]
        rates = np.array([e["rate"] for e in entries])
        errors = np.array([[e["rate"] - e["ci95"][0], e["ci95"][1] - e["rate"]] for e in entries]).T
        axis.bar(np.arange(len(names)) + 0.27 * (j - 1), rates, 0.27, yerr=errors, capsize=3, label=method)
    axis.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    axis.set_ylabel("ASR (share of red prompts drawn red)")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8)
    axis.set_title(f"Red team on the toy world ({report['prompts']} red prompts, 95 % Wilson intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_redteam")
    parser.add_argument("--work", default="runs/toy_redteam", help="image sets, attack outcomes and exports")
    parser.add_argument("--prompts", type=int, default=30, help="red prompts attacked (of 30)")
    parser.add_argument("--attack-reg", type=float, default=0.1, help="reg of the derived-embedding attack")
    parser.add_argument("--unlearndiff-steps", type=int, default=30)
    parser.add_argument("--ring-a-bell-generations", type=int, default=60)
    args = common.parse(parser, argv, positive=("prompts", "unlearndiff_steps", "ring_a_bell_generations"))
    report = run(args)
    common.write(args.out, report, table(report), lambda path: figure(report, path))


if __name__ == "__main__":
    main()
