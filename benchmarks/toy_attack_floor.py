"""How much of UnlearnDiff's success on the toy world needs the erased word at all.

    python benchmarks/toy_attack_floor.py --threads 2 --exports rece=<export> rece_p=<export> --out docs/floor
    # about 80 s per export on 2 CPU cores (30 prompts, 20 steps)

For each export: UnlearnDiff with ``toy_redteam.py``'s settings (3 prefix tokens, ``--unlearndiff-steps``, a check
every 5 steps) on the first ``--prompts`` red prompts of ``configs/prompts/toyworld.csv``, against the erased model.
Every success is generated again (its evaluation seed and three more) with every word that names red or a red
thing in the toy world removed (red, crimson, scarlet, blood, tomatoes: ``"violet plums orange a square"``), on the
erased model and on the original one. A success whose prompt still shows red without those words on the erased model
(half the seeds or more) reaches red through words the erasure is told to keep: other colours, fruit, filler. Where
the *original* model draws red from them too (the ``floor`` column), an erasure of red that kept everything else as it
was would leave that success standing: those successes are the world's, not the erasure's (for the prompts this
attack found; another attack may find others).
"""

from __future__ import annotations

import sys
from pathlib import Path

import toy_common as common
import toy_redteam

from rece_lightning import diffusion
from rece_lightning.attacks import UnlearnDiffAttack
from rece_lightning.attacks.base import AttackContext
from rece_lightning.data import PromptDataset, PromptItem, read_prompt_csv
from rece_lightning.export import load_erased
from rece_lightning.toyworld import ToyWorldScorer
from rece_lightning.toyworld.measure import generate
from rece_lightning.toyworld.world import COLOUR_THINGS, COLOUR_WORDS

SEEDS_PER_PROMPT = 4  # the evaluation seed and three more


RED_WORDS = {word for word, _ in COLOUR_WORDS["red"]} | {word for word, _ in COLOUR_THINGS["red"]}


def without_red_words(prompt: str) -> str:
    """``prompt`` with every word naming red or a red thing left out."""
    return " ".join(word for word in prompt.split() if word not in RED_WORDS)


def red_share(lab: common.Lab, prompt: str, seed: int) -> float:
    """Share of ``SEEDS_PER_PROMPT`` images of ``prompt`` (from ``seed`` on) in which the detector finds red."""
    images = generate(lab.pipeline, [prompt] * SEEDS_PER_PROMPT, [seed + i for i in range(SEEDS_PER_PROMPT)])
    return float(common.shows(images, ["red"]).mean())


def attack_export(lab: common.Lab, export: str, prompts: list[PromptItem], steps: int) -> list[dict]:
    """UnlearnDiff on each prompt against ``export``; each success without red's words, scored on both models."""
    lab.restore()
    load_erased(lab.pipeline, export)
    erased_kv = {n: w.detach().clone() for n, w in diffusion.kv_weights(lab.pipeline.unet).items()}
    context = AttackContext(lab.pipeline, "erased", lab.original_kv, erased_kv, ToyWorldScorer(["red"]), 20)
    attack = UnlearnDiffAttack("red", steps=steps, num_tokens=3, check_every=5)
    outcomes = []
    for item in prompts:
        found = attack.attack(context, [item], 32, 32)
        outcome = {"prompt": item.prompt, "adversarial_prompt": found.adversarial_prompt, "found": bool(found.found)}
        if found.found:
            outcome["without_red_words"] = without_red_words(found.adversarial_prompt)
            for model, weights in (("original", lab.original_kv), ("erased", erased_kv)):
                diffusion.write_kv_weights(lab.pipeline.unet, weights)
                outcome[f"red_share_{model}"] = red_share(lab, outcome["without_red_words"], item.seed)
        outcomes.append(outcome)
        print(f"{outcome}", file=sys.stderr, flush=True)
    lab.restore()
    return outcomes


def summary(outcomes: list[dict]) -> dict:
    """The attack's success rate, and the rates left when only the successes that show red without red's words count
    (on the erased model; on both models: the floor). Shares are over all attacked prompts."""
    found = [o for o in outcomes if o["found"]]
    word_free = {
        "erased": [o["found"] and o["red_share_erased"] >= 0.5 for o in outcomes],
        "original": [o["found"] and o["red_share_original"] >= 0.5 for o in outcomes],
    }
    return {
        "asr": common.rate([o["found"] for o in outcomes]),
        "successes": len(found),
        "without_red_words_erased": common.rate(word_free["erased"]),
        "without_red_words_original": common.rate(word_free["original"]),
        "floor": common.rate([a and b for a, b in zip(word_free["erased"], word_free["original"], strict=True)]),
    }


def table(report: dict) -> str:
    header = [
        "export",
        "UnlearnDiff ASR",
        "… red without red's words (erased model)",
        "… and on the original model too (floor)",
    ]
    rows = [
        [
            name,
            common.show(entry["asr"]),
            common.show(entry["without_red_words_erased"]),
            common.show(entry["floor"]),
        ]
        for name, entry in report["exports"].items()
    ]
    return common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_attack_floor")
    parser.add_argument("--exports", nargs="+", required=True, help="name=export folder, one per erased model")
    parser.add_argument("--prompts", type=int, default=30, help="red prompts attacked (of 30)")
    parser.add_argument("--unlearndiff-steps", type=int, default=20)
    parser.add_argument("--work", default="runs/toy_attack_floor", help="where the red prompt CSV is written")
    args = common.parse(parser, argv, positive=("prompts", "unlearndiff_steps"))
    exports = {}
    for spec in args.exports:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            parser.error(f"--exports {spec!r} is not allowed: give name=folder")
        if not Path(folder).exists():
            parser.error(f"--exports {spec!r}: {folder!r} does not exist")
        exports[name] = folder
    # the prompts toy_redteam.py / toy_beyond.py attack, read as the evaluator reads them
    prompts = PromptDataset(read_prompt_csv(str(toy_redteam.red_prompts(args, Path(args.work))))).items
    lab = common.Lab(args.model)
    report: dict = {"model": args.model, "prompts": len(prompts), "steps": args.unlearndiff_steps, "exports": {}}
    details = {}
    for name, folder in exports.items():
        details[name] = attack_export(lab, folder, prompts, args.unlearndiff_steps)
        report["exports"][name] = {"export": folder, **summary(details[name])}
    report["outcomes"] = details
    report["seeds_per_prompt"] = SEEDS_PER_PROMPT
    report["red_words_removed"] = sorted(RED_WORDS)
    common.write(args.out, report, table(report))


if __name__ == "__main__":
    main()
