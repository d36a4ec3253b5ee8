"""Beyond RECE on the toy world: UCE, RECE, hard preservation (RECE-NS), an attack in the loop (RECE-ADV) and both
(RECE-ADV+NS), measured on the analogs of the paper's Table 1 (named and implicit prompts, the other colours kept),
Table 4 (every red-team attack's ASR) and the many-concepts setting (k colours at once), with a Pareto plot of ASR
against retained accuracy.

    python benchmarks/toy_beyond.py --out docs/toy_beyond      # about 15 min on 2 CPU cores

Each method erases "red" (guide " ") and stops at the state the checkpoint selector picks (the first whose c'
probes show no red, else the fewest; benchmarks/toy_common.py). Hard preservation keeps the other seven colour
as "a <colour> circle" and "a <colour> square" (their K/V outputs at all 16 positions: the principal directions
holding ``--energy`` of their energy); the
in-loop attack erases, each round, the ``--budget`` vocabulary words whose K/V come closest to red's original ones.
The attacks of Table 4 run through the evaluator (benchmarks/toy_redteam.py), on 30 red prompts: none of them is the
in-loop attack. Every rate has its 95 % Wilson interval. Prints JSON; writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import toy_common as common
import toy_redteam

from rece_lightning.methods import RECE, AdversarialRECE, HardPreservation, NullSpaceRECE, ProjectionRECE
from rece_lightning.toyworld import COLOURS, SHAPES
from rece_lightning.toyworld.measure import combination_prompts, implicit_prompts

ORDER = ("red", "blue", "green", "yellow", "purple", "cyan", "orange", "pink")  # the first k are erased


def preserved(preserve: str, erased: list[str]) -> list[str]:
    """The prompts hard preservation keeps: the other colours as "a <colour> circle" / "a <colour> square"
    (``--preserve circle-square``), or on every shape and as the bare colour word (``shapes-and-words``)."""
    others = [c for c in COLOURS if c not in erased]
    if preserve == "circle-square":
        return [f"a {c} {shape}" for c in others for shape in ("circle", "square")]
    return [f"a {c} {shape}" for c in others for shape in SHAPES] + others


def add_recipe_options(parser, rows: str, preserve: str) -> None:
    """The options :func:`recipes` reads (``rows`` / ``preserve``: their defaults)."""
    parser.add_argument("--energy", type=float, default=0.9, help="share of the preserved rows' energy protected")
    parser.add_argument("--rows", choices=["all", "tokens"], default=rows, help="preserved prompts' rows kept")
    parser.add_argument(
        "--preserve", choices=["circle-square", "shapes-and-words"], default=preserve, help="the kept prompts"
    )
    parser.add_argument("--ns-reg", type=float, default=None, help="Eq. 7's reg of the hard-preserving methods")
    parser.add_argument(
        "--ns-erase-scale", type=float, default=None, help="Eq. 3's erase scale of the hard-preserving methods"
    )
    parser.add_argument("--share", type=float, default=0.9, help="RECE-P: share of the out-of-reach energy removed")
    parser.add_argument("--budget", type=int, default=4, help="words the in-loop attack erases per round")
    parser.add_argument(
        "--attack", choices=["vocabulary", "prompt_search"], default="vocabulary", help="the in-loop attack"
    )


def check_recipe_options(parser, args) -> None:
    """Refuse an energy outside (0, 1], a reg or an erase scale <= 0 before any model loads (``--budget``:
    common.parse's check)."""
    if not 0 < args.energy <= 1:
        parser.error(f"--energy={args.energy} is not allowed: it must be in (0, 1]")
    if args.ns_reg is not None and not args.ns_reg > 0:
        parser.error(f"--ns-reg={args.ns_reg} is not allowed: it must be > 0")
    if not 0 < args.share <= 1:
        parser.error(f"--share={args.share} is not allowed: it must be in (0, 1]")
    if args.ns_erase_scale is not None and not args.ns_erase_scale > 0:
        parser.error(f"--ns-erase-scale={args.ns_erase_scale} is not allowed: it must be > 0")


def recipes(args, erased: list[str]) -> dict[str, tuple]:
    """(method class, its options, preserved concepts) of each method beyond UCE."""
    kept = preserved(args.preserve, erased)
    hard = HardPreservation(energy=args.energy, rows=args.rows)
    hard_options = {"hard_preservation": hard, **({"reg": args.ns_reg} if args.ns_reg is not None else {})}
    if args.ns_erase_scale is not None:
        hard_options["erase_scale"] = args.ns_erase_scale
    attack = {"attack": args.attack, "attack_budget": args.budget}
    return {
        "rece": (RECE, {}, None),
        "rece_ns": (NullSpaceRECE, hard_options, kept),
        "rece_adv": (AdversarialRECE, attack, None),
        "rece_adv_ns": (AdversarialRECE, {**attack, **hard_options}, kept),
        "rece_p": (ProjectionRECE, {**hard_options, "share": args.share}, kept),
    }


def many_concepts_sets(erased: list[str]) -> tuple[common.ImageSet, common.ImageSet]:
    """The many-concepts image sets (every colour x shape x texture x template, one image each): the kept colours'
    prompts and the ``erased`` colours' prompts."""
    every = common.ImageSet.of(combination_prompts(list(COLOURS), images_per_combination=1), seed=40_000)
    return every.where(colour=lambda c: c not in erased), every.where(colour=lambda c: c in erased)


def erase(lab: common.Lab, args, erased: list[str]) -> dict[str, common.State]:
    """original, UCE and every method at its selected state."""
    states: dict[str, common.State] = {}
    for name, (method, options, preserve) in recipes(args, erased).items():
        if name not in args.methods:
            continue
        reached = lab.states(
            erased,
            " ",
            max_epochs=args.max_epochs,
            probes=args.probes,
            fixed_epochs=args.fixed_epochs,
            method=method,
            preserve_concepts=preserve,
            **options,
        )
        states.setdefault("original", reached["original"])
        states.setdefault("uce", reached["uce"])
        states[name] = reached["rece"]
        print(f"{erased} {name}: epoch {reached['rece'].record['selected_epoch']}", file=sys.stderr, flush=True)
    return states


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_beyond")
    parser.add_argument("--work", default="runs/toy_beyond", help="exports, image sets and attack outcomes")
    add_recipe_options(parser, rows="all", preserve="circle-square")
    parser.add_argument(
        "--fixed-epochs",
        action="store_true",
        help="every method after --max-epochs rounds (the paper's fixed counts) instead of the selector's state",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["rece", "rece_ns", "rece_adv", "rece_adv_ns", "rece_p"],
        default=["rece", "rece_ns", "rece_adv", "rece_adv_ns"],
        help="the methods beside the original and UCE (rece first: UCE's state comes from it)",
    )
    parser.add_argument("--k", type=int, default=4, help="colours erased at once in the many-concepts part")
    parser.add_argument("--prompts", type=int, default=30, help="red prompts attacked (of 30)")
    parser.add_argument("--attack-reg", type=float, default=0.1, help="reg of the derived-embedding attack")
    parser.add_argument("--unlearndiff-steps", type=int, default=30)
    parser.add_argument("--ring-a-bell-generations", type=int, default=60)
    parser.add_argument("--skip-attacks", action="store_true", help="leave Table 4 out (minutes)")
    args = common.parse(parser, argv, positive=("budget", "k", "prompts"))
    check_recipe_options(parser, args)
    work = Path(args.work)
    lab = common.Lab(args.model)
    others = [c for c in COLOURS if c != "red"]
    named = common.ImageSet.of(combination_prompts(["red"], images_per_combination=2), seed=10_000)
    implicit = common.ImageSet.of(implicit_prompts(["red"], images_per_phrase=5), seed=11_000, repeats=2)
    unrelated = common.ImageSet.of(combination_prompts(others, images_per_combination=1), seed=12_000)
    report: dict = {
        "model": args.model,
        "energy": args.energy,
        "rows": args.rows,
        "preserve": args.preserve,
        "ns_reg": args.ns_reg,
        "ns_erase_scale": args.ns_erase_scale,
        "fixed_epochs": args.fixed_epochs,
        "budget": args.budget,
        "share": args.share,
        "attack": args.attack,
        "methods": {},
    }
    started = time.perf_counter()
    states = erase(lab, args, ["red"])
    exports = {}
    for name, state in states.items():
        module = lab.apply(state)
        if module is not None:
            exports[name] = str(module.export(work / "exports" / name))
        report["methods"][name] = {
            "named_rate": common.rate(common.shows(lab.images(named), ["red"])),
            "implicit_rate": common.rate(common.shows(lab.images(implicit), ["red"])),
            "other_colour_accuracy": common.rate(common.hits(lab.images(unrelated), unrelated.labels, "colour")),
            "erasure_seconds": round(state.seconds, 3),
            **state.record,
        }
    # many concepts: k colours at once, the rest kept
    erased = list(ORDER[: args.k])
    kept, targets = many_concepts_sets(erased)
    for name, state in erase(lab, args, erased).items():
        lab.apply(state)
        report["methods"][name]["many"] = {
            "erased": erased,
            "erased_rate": common.rate(common.shows(lab.images(targets), erased)),
            "retained_accuracy": common.rate(common.hits(lab.images(kept), kept.labels, "colour")),
            "erasure_seconds": round(state.seconds, 3),
        }
    if not args.skip_attacks:
        csv = toy_redteam.red_prompts(args, work)
        report["attacks"] = toy_redteam.attack_report(args, exports, work / "attacks", csv)
    report["seconds"] = round(time.perf_counter() - started, 1)
    common.write(args.out, report, table(report), lambda path: pareto(report, path))


LABELS = {
    "original": "original",
    "uce": "UCE",
    "rece": "RECE",
    "rece_ns": "RECE-NS",
    "rece_adv": "RECE-ADV",
    "rece_adv_ns": "RECE-ADV+NS",
    "rece_p": "RECE-P",
}


def worst_asr(report: dict, method: str) -> float | None:
    attacks = report.get("attacks", {}).get("asr", {})
    rates = [by[method]["rate"] for name, by in attacks.items() if name != "no_attack" and method in by]
    return max(rates) if rates else None


def table(report: dict) -> str:
    methods = report["methods"]
    names = list(methods)
    rows = [
        ["red on its named prompts", *(common.show(methods[m]["named_rate"]) for m in names)],
        ["red on the implicit set", *(common.show(methods[m]["implicit_rate"]) for m in names)],
        ["other colours' accuracy", *(common.show(methods[m]["other_colour_accuracy"]) for m in names)],
    ]
    for attack, by in report.get("attacks", {}).get("asr", {}).items():
        rows.append([f"ASR: {attack}", *(common.show(by[m]) if m in by else "–" for m in names)])
    many = methods[names[-1]]["many"]
    rows += [
        [
            f"k = {len(many['erased'])}: erased colours' rate",
            *(common.show(methods[m]["many"]["erased_rate"]) for m in names),
        ],
        [
            f"k = {len(many['erased'])}: retained accuracy",
            *(common.show(methods[m]["many"]["retained_accuracy"]) for m in names),
        ],
        ["epoch selected", "–", "–", *(str(methods[m].get("selected_epoch", "–")) for m in names[2:])],
        ["erasure time, k = 1 (s)", "–", *(f"{methods[m]['erasure_seconds']:.2f}" for m in names[1:])],
        [
            f"erasure time, k = {len(many['erased'])} (s)",
            "–",
            *(f"{methods[m]['many']['erasure_seconds']:.2f}" for m in names[1:]),
        ],
    ]
    return common.markdown_table(["", *(LABELS[m] for m in names)], rows)


def pareto(report: dict, path: Path) -> None:
    """ASR of the strongest attack (else the named-prompt rate) against the other colours' retained accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5.5, 4.2))
    for name, entry in report["methods"].items():
        worst = worst_asr(report, name)
        y = entry["named_rate"]["rate"] if worst is None else worst
        x = entry["other_colour_accuracy"]["rate"]
        axis.scatter([x], [y], s=40)
        axis.annotate(LABELS[name], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.set_xlabel("other colours' accuracy (k = 1)")
    axis.set_ylabel("ASR of the strongest attack" if report.get("attacks") else "red rate on its named prompts")
    axis.set_xlim(0, 1.05)
    axis.set_ylim(-0.02, 1.05)
    axis.set_title("Erasing red on the toy world: lower right is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
