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

from rece_lightning.toyworld import ToyWorldScorer, predict


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_walk")
    parser.add_argument("--k", type=int, default=4, help="colours erased at once (the first k of toy_beyond.ORDER)")
    parser.add_argument("--method", choices=["rece", "rece_ns", "rece_adv", "rece_adv_ns"], default="rece_ns")
    toy_beyond.add_recipe_options(parser, rows="tokens", preserve="shapes-and-words")
    parser.set_defaults(probes=12)
    args = common.parse(parser, argv, positive=("k", "budget"))
    toy_beyond.check_recipe_options(parser, args)
    if args.k > len(toy_beyond.ORDER) - 1:
        parser.error(f"--k={args.k} is not allowed: at most {len(toy_beyond.ORDER) - 1} (one colour must be kept)")
    erased = list(toy_beyond.ORDER[: args.k])
    kept, targets = toy_beyond.many_concepts_sets(erased)
    lab = common.Lab(args.model)
    method, options, preserve = toy_beyond.recipes(args, erased)[args.method]  # as toy_beyond.py builds it
    module = lab.module(erased, " ", method=method, preserve_concepts=preserve, **options)
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
    keys = ("model", "k", "method", "energy", "rows", "preserve", "ns_reg", "budget", "probes")
    report = {key: getattr(args, key) for key in keys}
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
