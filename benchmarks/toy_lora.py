"""How much of the erasure a truncated LoRA keeps: ranks 16 / 64 / full of RECE's state on the toy model.

RECE erases "red" (the toy config's recipe, the state its selector picks); the state is exported as a LoRA
(``rece_lightning.lora``) at each rank and applied as ``W + lora_B lora_A``. For each rank: the relative K/V error, the
share of the edit's energy kept, and on images of red and of other-colour prompts (same seeds): red's rate, the other
colours' accuracy, and the mean absolute pixel change against the exact state's images.

    python benchmarks/toy_lora.py             # about 1 minute on 2 CPU cores (OMP_NUM_THREADS=1)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_common as common  # noqa: E402

from rece_lightning import diffusion  # noqa: E402
from rece_lightning.lora import lora_layers  # noqa: E402
from rece_lightning.toyworld import COLOURS  # noqa: E402
from rece_lightning.toyworld.measure import combination_prompts  # noqa: E402

RANKS = (16, 64, None)


def main(argv=None) -> None:
    parser = common.parser(__doc__, out="docs/toy_lora")
    args = common.parse(parser, argv)
    others = [c for c in COLOURS if c != "red"]
    sets = {
        "red": common.ImageSet.of(combination_prompts(colours=["red"], images_per_combination=1), seed=40_000),
        "other": common.ImageSet.of(combination_prompts(colours=others, images_per_combination=1), seed=41_000),
    }
    lab = common.Lab(args.model)
    states = lab.states(["red"], " ", max_epochs=args.max_epochs, probes=args.probes, reg=0.1)
    module = lab.apply(states["rece"])
    exact = {part: lab.images(image_set) for part, image_set in sets.items()}
    report = {"model": args.model, "erased": "red", "rece_state": states["rece"].record, "ranks": {}}
    report["exact"] = {
        "red_rate": common.rate(common.shows(exact["red"], ["red"])),
        "other_colour_accuracy": common.rate(common.hits(exact["other"], sets["other"].labels, "colour")),
    }
    transform = module.transform.detach().cpu()
    for rank in RANKS:
        lora = lora_layers(module.original_kv, transform, rank)
        weights = {
            name: (module.original_kv[name].double() + up.double() @ down.double()).to(module.original_kv[name].dtype)
            for name, (down, up) in lora.layers.items()
        }
        diffusion.write_kv_weights(lab.pipeline.unet, weights)
        images = {part: lab.images(image_set) for part, image_set in sets.items()}
        change = np.mean([np.abs(images[p].astype(float) - exact[p].astype(float)).mean() for p in sets])
        report["ranks"]["full" if rank is None else str(rank)] = {
            "rank": lora.rank,
            "full_rank": lora.full_rank,
            "kept_energy": lora.kept_energy,
            "relative_kv_error": lora.relative_error,
            "mean_abs_pixel_change_0_255": float(change),
            "red_rate": common.rate(common.shows(images["red"], ["red"])),
            "other_colour_accuracy": common.rate(common.hits(images["other"], sets["other"].labels, "colour")),
        }
    rows = [
        [
            name,
            str(entry["rank"]),
            f"{entry['kept_energy']:.4f}",
            f"{entry['relative_kv_error']:.1e}",
            f"{entry['mean_abs_pixel_change_0_255']:.2f}",
            common.show(entry["red_rate"]),
            common.show(entry["other_colour_accuracy"]),
        ]
        for name, entry in report["ranks"].items()
    ]
    rows.append(
        ["exact state", "-", "1", "0", "0", common.show(report["exact"]["red_rate"]),
         common.show(report["exact"]["other_colour_accuracy"])]
    )  # fmt: skip
    header = ["LoRA", "rank", "energy kept", "K/V rel. error", "pixel change", "red rate", "other colours"]
    common.write(args.out, report, common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
