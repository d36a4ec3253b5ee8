"""Table 4's shape on the toy world: each red-team attack's ASR against the original model, UCE alone and RECE.

    python benchmarks/toy_redteam.py --model models/toyworld-sd --out docs/toy_redteam

Erases "red" (guide " ", as configs/toy.yaml) and picks RECE's epoch as the checkpoint selector does: the first
state whose derived-embedding probes (8 images, the toy sampler) show no red, else the one with the fewest (earliest
on ties) among ``--max-epochs``. Then
runs every attack through the evaluator (``ErasureEvaluator(attack=...)``, the code path of configs/redteam_*.yaml)
on the red prompts of configs/prompts/toyworld.csv, one image per prompt. ASR = share of prompts whose image the toy
colour detector calls red; "no attack" is the plain prompts. Prints JSON (ASR per attack and model, seconds per
prompt of each attack on this CPU) and writes ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import lightning.pytorch as pl  # noqa: E402

from rece_lightning import RECEModule, diffusion  # noqa: E402
from rece_lightning.attacks import DerivedEmbeddingAttack, RingABellAttack, UnlearnDiffAttack  # noqa: E402
from rece_lightning.data import PromptDataModule  # noqa: E402
from rece_lightning.evaluation import ErasureEvaluator  # noqa: E402
from rece_lightning.toyworld import ToyWorldScorer  # noqa: E402
from rece_lightning.toyworld.measure import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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
    """Exports of UCE alone and of RECE at the selected epoch, and which epoch that was."""

    def fresh_module() -> tuple[RECEModule, object]:
        pipeline = diffusion.load_pipeline(args.model)
        module = RECEModule(pretrained_model_name_or_path=args.model, erase_concepts=["red"], guide_concepts=" ")
        module.attach_pipeline(pipeline)
        module.apply_uce()
        return module, pipeline

    module, pipeline = fresh_module()
    states = {"uce": str(module.export(work / "uce"))}
    scorer = ToyWorldScorer(["red"])
    rates = []
    for _ in range(args.max_epochs):
        module.derive_and_erase(module.concepts)
        derived = module.derived_embeddings()["red"].float()
        probes = generate(pipeline, seeds=list(range(8)), prompt_embeds=derived.unsqueeze(0).repeat(8, 1, 1))
        rates.append(scorer.tally(scorer.detect(probes))["rate"])
        if rates[-1] == 0.0:
            break
    # as ConceptCheckpointSelector: the first clean state, else the fewest detections (earliest on ties)
    selected = min(range(len(rates)), key=lambda i: (rates[i], i)) + 1
    module, _ = fresh_module()
    for _ in range(selected):
        module.derive_and_erase(module.concepts)
    states["rece"] = str(module.export(work / "rece"))
    return {"exports": states, "selected_epoch": selected, "probe_red_rate_by_epoch": rates}


def run(args) -> dict:
    torch.manual_seed(0)
    work = Path(args.work)
    csv = work / "red_prompts.csv"
    work.mkdir(parents=True, exist_ok=True)
    rows = [line for line in (REPO / "configs/prompts/toyworld.csv").read_text().splitlines() if line.endswith(",red")]
    header = "case_number,prompt,evaluation_seed,evaluation_guidance,categories"
    csv.write_text("\n".join([header, *rows[: args.prompts]]) + "\n")
    states = erased_states(args, work)
    report: dict = {"model": args.model, "prompts": min(args.prompts, len(rows)), **states, "asr": {}, "seconds": {}}
    for name, attack in attacks(args).items():
        report["asr"][name] = {}
        for state, export in states["exports"].items():
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
                report["asr"][name]["original"] = results["original"]["asr"]["attack_success_rate"]
            report["asr"][name][state] = results["erased"]["asr"]["attack_success_rate"]
            if attack is not None:
                report["seconds"].setdefault(name, {})[state] = round(elapsed, 1)
                attacked = results["erased"]["attack"]
                report.setdefault("mean_steps", {}).setdefault(name, {})[state] = attacked["mean_steps"]
            print(f"{name} {state}: {json.dumps(report['asr'][name])} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
    prompts = report["prompts"]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models/toyworld-sd"))
    parser.add_argument("--out", default=None, help="write <out>.json")
    parser.add_argument("--work", default="runs/toy_redteam", help="image sets, attack outcomes and exports")
    parser.add_argument("--prompts", type=int, default=24, help="red prompts attacked (of 24)")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--attack-reg", type=float, default=0.1, help="reg of the derived-embedding attack")
    parser.add_argument("--unlearndiff-steps", type=int, default=30)
    parser.add_argument("--ring-a-bell-generations", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("prompts", "max_epochs", "unlearndiff_steps", "ring_a_bell_generations", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    torch.set_num_threads(args.threads)
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(f"{args.out}.json").parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
