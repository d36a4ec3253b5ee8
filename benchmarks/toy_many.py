"""Many concepts at once, in miniature: erase k = 1, 2, 4 colours together (guide " ") and measure the erased
colours' rate on their named prompts, the retained colour accuracy of the colours left, and the erasure time, for UCE
alone and RECE at the selector's state (every erased colour's c' probes clean). The published figures this stands
for: retained accuracy after erasing 10 / 50 / 100 celebrities, RECE 67 / 20 / 24 %, SPEED 89 / 88 / 86 % (SPEED,
ICLR 2026, Tab. 2).

    python benchmarks/toy_many.py --out docs/toy_many      # about 4 min on 2 CPU cores

Rates have 95 % Wilson intervals. Prints JSON; writes <out>.json, <out>.md and <out>.png (retained accuracy vs k).
"""

from __future__ import annotations

import toy_common as common

from rece_lightning.toyworld import COLOURS
from rece_lightning.toyworld.measure import combination_prompts

ORDER = ("red", "blue", "green", "yellow", "purple", "cyan", "orange", "pink")  # the first k are erased


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_many")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="numbers of colours erased at once")
    parser.add_argument("--reg", type=float, default=0.1)
    args = common.parse(parser, argv)
    for k in args.k:
        if not 1 <= k < len(COLOURS):
            parser.error(f"--k {k} is not allowed: erase 1 to {len(COLOURS) - 1} of the {len(COLOURS)} colours")
    named = common.ImageSet.of(combination_prompts(list(COLOURS), images_per_combination=1), seed=40_000)
    lab = common.Lab(args.model)
    report = {"model": args.model, "reg": args.reg, "k": {}}
    for k in args.k:
        erased = list(ORDER[:k])
        kept = named.where(colour=lambda c, erased=erased: c not in erased)
        targets = named.where(colour=lambda c, erased=erased: c in erased)
        states = lab.states(erased, " ", max_epochs=args.max_epochs, probes=args.probes, reg=args.reg)
        entry = {"erased": erased}
        for name, state in states.items():
            lab.apply(state)
            kept_hits = common.hits(lab.images(kept), kept.labels, "colour")
            entry[name] = {
                "erased_rate": common.rate(common.shows(lab.images(targets), erased)),
                "retained_accuracy": common.rate(kept_hits),
                "erasure_seconds": round(state.seconds, 3),
                **state.record,
            }
        report["k"][str(k)] = entry
    rows = []
    for k, entry in report["k"].items():
        for method in ("uce", "rece"):
            m = entry[method]
            epoch = f", epoch {m['selected_epoch']}" if method == "rece" else ""
            rows.append(
                [
                    k,
                    method.upper() + epoch,
                    common.show(m["erased_rate"]),
                    common.show(m["retained_accuracy"]),
                    f"{m['erasure_seconds']:.2f}",
                ]
            )
    table = common.markdown_table(
        ["k", "method", "erased colours' rate", "retained accuracy of the rest", "erasure (s)"], rows
    )

    def figure(path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = [int(k) for k in report["k"]]
        fig, axis = plt.subplots(figsize=(5, 3.5))
        for method, style in (("original", "k:"), ("uce", "o-"), ("rece", "s-")):
            values = [report["k"][str(k)][method]["retained_accuracy"]["rate"] for k in ks]
            axis.plot(ks, values, style, label=method)
        axis.set_xlabel("colours erased at once (k)")
        axis.set_ylabel("colour accuracy of the colours kept")
        axis.set_ylim(0, 1.03)
        axis.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    common.write(args.out, report, table, figure)


if __name__ == "__main__":
    main()
