"""Table 3 of the paper in miniature: a texture plays an artist's style. Erase "checkered" (guide " ", λ = 1e-3 as
the authors' artist setting) and measure:

* LPIPS_e: how far the images of the erased texture's prompts moved from the original model's (same prompts and
  seeds; higher is a stronger erasure);
* LPIPS_u: the same on the other textures' prompts (lower is better preserved);
* texture accuracy on both (95 % Wilson intervals).

    python benchmarks/toy_style.py --out docs/toy_style      # about 2 min on 2 CPU cores

LPIPS runs over a seeded random CNN (no AlexNet weights offline): comparable within this table only. Columns:
original, UCE alone, RECE at the selector's state. Prints JSON; writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import toy_common as common

from rece_lightning.toyworld import TEXTURES


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_style")
    parser.add_argument("--texture", default="checkered", choices=[t for t in TEXTURES if t != "plain"])
    parser.add_argument("--guide", default=" ")
    parser.add_argument("--reg", type=float, default=1e-3, help="λ of Eq. 7 (the artists' setting)")
    args = common.parse(parser, argv)
    common.attribute_erasure(args, "texture", args.texture, "Erasing a texture (a style)")


if __name__ == "__main__":
    main()
