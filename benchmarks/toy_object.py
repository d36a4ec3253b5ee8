"""The paper's object-erasure task (appendix) in miniature: a shape plays an object class. Erase "triangle" (guide
" ", λ = 0.1 as the authors' easy objects) and compare the erased shape's accuracy on its own prompts (and on prompts
that name it by a synonym: "a pyramid", "a wedge") with the other shapes' accuracy (95 % Wilson intervals), and the
LPIPS of both image sets against the original model's.

    python benchmarks/toy_object.py --out docs/toy_object      # about 2 min on 2 CPU cores

Columns: original, UCE alone, RECE at the selector's state. Prints JSON; writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import toy_common as common

from rece_lightning.toyworld import SHAPES


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_object")
    parser.add_argument("--shape", default="triangle", choices=list(SHAPES))
    parser.add_argument("--guide", default=" ")
    parser.add_argument("--reg", type=float, default=0.1, help="λ of Eq. 7 (the authors' easy objects)")
    args = common.parse(parser, argv)
    common.attribute_erasure(args, "shape", args.shape, "Erasing a shape (an object)")


if __name__ == "__main__":
    main()
