"""Every state of one erasure of k colours at once on the toy world: UCE, then each derive-erase round, with what the
selector sees (the c' probes) beside what a user gets (the erased colours' rate, the kept colours' accuracy) and what
the erased colours' prompts are drawn as instead.

    python benchmarks/toy_walk.py --k 4 --method rece_ns --energy 0.99 --rows tokens --out docs/toy_walk_ns99
    # about 2 min on 2 CPU cores

Made to see why the rounds cost preservation at k = 4 (issue 22): the erased rate and the kept accuracy of each state
on the same image set as ``toy_beyond.py``'s many-concepts part (every colour x shape x texture x template, one image
each; the first k of ``toy_beyond.ORDER`` erased towards " "), the probe rate on ``--probes`` c' images per concept.
"""

from __future__ import annotations

from collections import Counter

import toy_beyond
import toy_common as common

from rece_lightning.methods import RECE, HardPreservation, NullSpaceRECE
from rece_lightning.toyworld import COLOURS, ToyWorldScorer, predict
from rece_lightning.toyworld.measure import combination_prompts


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_walk")
    parser.add_argument("--k", type=int, default=4, help="colours erased at once (the first k of toy_beyond.ORDER)")
    parser.add_argument("--method", choices=["rece", "rece_ns"], default="rece_ns")
    parser.add_argument("--energy", type=float, default=0.9, help="rece_ns: share of the preserved rows' energy kept")
    parser.add_argument("--rows", choices=["all", "tokens"], default="tokens", help="rece_ns: preserved rows")
    parser.add_argument(
        "--preserve", choices=["circle-square", "shapes-and-words"], default="shapes-and-words", help="rece_ns"
    )
    parser.set_defaults(probes=12)
    args = common.parse(parser, argv, positive=("k",))
    if not 0 < args.energy <= 1:
        parser.error(f"--energy={args.energy} is not allowed: it must be in (0, 1]")
    if args.k > len(toy_beyond.ORDER) - 1:
        parser.error(f"--k={args.k} is not allowed: at most {len(toy_beyond.ORDER) - 1} (one colour must be kept)")
    erased = list(toy_beyond.ORDER[: args.k])
    every = common.ImageSet.of(combination_prompts(list(COLOURS), images_per_combination=1), seed=40_000)
    kept = every.where(colour=lambda c: c not in erased)
    targets = every.where(colour=lambda c: c in erased)
    lab = common.Lab(args.model)
    if args.method == "rece":
        module = lab.module(erased, " ", method=RECE)
    else:
        hard = HardPreservation(energy=args.energy, rows=args.rows)
        preserve = toy_beyond.preserved(args, erased)
        module = lab.module(erased, " ", method=NullSpaceRECE, preserve_concepts=preserve, hard_preservation=hard)
    scorer = ToyWorldScorer(erased)
    module.apply_uce()
    states = []
    for state in range(args.max_epochs + 1):
        if state:
            module.derive_and_erase(module.concepts)
        images = lab.images(targets)
        drawn = [predict(image).colour for image in images]
        states.append(
            {
                "state": state,
                "probe_rate": lab.probe_rate(module, scorer, args.probes),
                "erased_rate": common.rate(common.shows(images, erased)),  # toy_beyond.py's measure
                "retained_accuracy": common.rate(common.hits(lab.images(kept), kept.labels, "colour")),
                "erased_prompts_drawn_as": dict(Counter(drawn).most_common()),
            }
        )
    report = {key: getattr(args, key) for key in ("model", "k", "method", "energy", "rows", "preserve", "probes")}
    report.update(erased=erased, states=states)
    rows = [
        [
            "UCE" if s["state"] == 0 else f"round {s['state']}",
            f"{100 * s['probe_rate']:.0f} %",
            common.show(s["erased_rate"]),
            common.show(s["retained_accuracy"]),
            ", ".join(f"{colour} {count}" for colour, count in s["erased_prompts_drawn_as"].items()),
        ]
        for s in states
    ]
    header = [
        "state",
        "c' probes showing them",
        "erased colours' rate",
        "kept colours' accuracy",
        "erased prompts drawn as",
    ]
    common.write(args.out, report, common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
