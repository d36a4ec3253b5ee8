"""Table 1 of the paper in miniature: the unsafe concept is "red" (guide " "), measured on prompts that name it and on
the implicit set, the toy world's I2P (prompts that bring red without saying it: "a crimson disc", "a square the
colour of blood").

    python benchmarks/toy_table1.py --out docs/toy_table1      # about 3 min on 2 CPU cores

Columns: the original model, UCE alone, RECE at the state the selector picks (configs/toy.yaml's rule). Rows:

* the concept's rate on its named prompts and on the implicit set (synonyms and indirect descriptions apart);
* colour accuracy of the other colours' named prompts, and of red's neighbours on the wheel (orange, pink) alone;
* FID / LPIPS of the other colours' images against the original model's (same prompts and seeds) over a seeded
  random CNN: comparable within this table only;
* the erasure's time.

Every rate has a 95 % Wilson interval. Prints JSON; writes <out>.json, <out>.md (the table) and <out>.png.
"""

from __future__ import annotations

import toy_common as common

from rece_lightning.toyworld import COLOURS
from rece_lightning.toyworld.measure import combination_prompts, implicit_prompts

NEIGHBOURS = {"red": ("orange", "pink")}


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_table1")
    parser.add_argument("--concept", default="red", choices=list(COLOURS))
    parser.add_argument("--guide", default=" ")
    parser.add_argument("--reg", type=float, default=0.1, help="λ of Eq. 7 (the nudity setting)")
    parser.add_argument("--preserve", nargs="*", default=None, help="preserved concepts (default: none)")
    parser.add_argument("--preserve-scale", type=float, default=0.1, help="λ1 of Eq. 2")
    args = common.parse(parser, argv)
    concept = args.concept
    others = [c for c in COLOURS if c != concept]
    named = common.ImageSet.of(combination_prompts([concept], images_per_combination=2), seed=10_000, repeats=2)
    implicit = common.ImageSet.of(implicit_prompts([concept], images_per_phrase=5), seed=11_000, repeats=3)
    unrelated = common.ImageSet.of(combination_prompts(others, images_per_combination=2), seed=12_000)
    hyper = {"reg": args.reg, "preserve_concepts": args.preserve, "preserve_scale": args.preserve_scale}
    lab = common.Lab(args.model)
    states = lab.states([concept], args.guide, max_epochs=args.max_epochs, probes=args.probes, **hyper)
    report = {"model": args.model, "concept": concept, "guide": args.guide, **hyper, "methods": {}}
    pictures, reference = {}, None
    for name, state in states.items():
        lab.apply(state)
        named_images, implicit_images, unrelated_images = (lab.images(s) for s in (named, implicit, unrelated))
        reference = unrelated_images if reference is None else reference
        kinds = [labels["kind"] for labels in implicit.labels]
        found = common.shows(implicit_images, [concept])
        colour_hits = common.hits(unrelated_images, unrelated.labels, "colour")
        entry = {
            "named_rate": common.rate(common.shows(named_images, [concept])),
            "implicit_rate": common.rate(found),
            **{f"{kind}_rate": common.rate(found[[k == kind for k in kinds]]) for kind in ("synonym", "indirect")},
            "other_colour_accuracy": common.rate(colour_hits),
            **{
                f"{c}_accuracy": common.rate(colour_hits[[labels["colour"] == c for labels in unrelated.labels]])
                for c in NEIGHBOURS.get(concept, ())
            },
            **common.paired_distances(unrelated_images, reference),
            "erasure_seconds": round(state.seconds, 3),
            **state.record,
        }
        report["methods"][name] = entry
        pictures[name] = [*named_images[:8], *implicit_images[:8]]
    rows = [
        (f"{concept} on its named prompts ({len(named)})", "named_rate"),
        (f"{concept} on the implicit set ({len(implicit)})", "implicit_rate"),
        ("… synonyms", "synonym_rate"),
        ("… indirect descriptions", "indirect_rate"),
        (f"other colours' accuracy ({len(unrelated)})", "other_colour_accuracy"),
        *((f"{c}'s accuracy (a neighbour)", f"{c}_accuracy") for c in NEIGHBOURS.get(concept, ())),
    ]
    methods = report["methods"]
    table = common.markdown_table(
        ["", *common.METHODS],
        [
            *([label, *(common.show(methods[m][key]) for m in common.METHODS)] for label, key in rows),
            ["FID of unrelated prompts (random CNN)", *(f"{methods[m]['fid']:.2f}" for m in common.METHODS)],
            ["LPIPS of unrelated prompts (random CNN)", *(f"{methods[m]['lpips']:.3f}" for m in common.METHODS)],
            ["erasure time (s)", "–", *(f"{methods[m]['erasure_seconds']:.2f}" for m in common.METHODS[1:])],
        ],
    )
    title = f"Erasing '{concept}': 8 named then 8 implicit prompts; RECE at epoch {methods['rece']['selected_epoch']}"
    common.write(args.out, report, table, lambda path: common.grid(pictures, path, title))


if __name__ == "__main__":
    main()
