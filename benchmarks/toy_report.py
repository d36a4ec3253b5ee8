"""RECE measured on the toy world: does UCE leave a c' that regenerates the concept, and do RECE's epochs remove it?

    python benchmarks/toy_report.py --model models/toyworld-sd --out docs/toy_report

For the original model, after UCE alone (state 0) and after each RECE epoch 1..N, on the shipped toy model:

* ``concept_rate_prompts``: share of images of prompts that contain the concept ("a red circle", "a photo of a
  striped red square", ...) in which the detector finds the concept;
* ``concept_rate_probes``: the same on images generated from the derived embedding c' of that state (Eq. 8);
* ``other_colour_accuracy``: colour accuracy on prompts of the other colours (what must be spared);
* ``erased_shape_accuracy``: shape accuracy on the concept's prompts (the object should stay, only its colour go);
* ``erased_prompts_colours``: which colour the concept's prompts draw instead;
* ``guide_concept_rate`` (original model only): how often the guide prompt itself draws the concept. The empty
  prompt " " is the unconditional model, which draws every colour of the world (red in about a fifth of its images);
  the erased prompts need not go there: "a red circle" without its colour word is "a circle", which draws grey;
* ``fid_unrelated`` / ``lpips_unrelated``: the other colours' images against the original model's (same prompts and
  seeds), over a seeded random CNN (no Inception / AlexNet offline): comparable within this report only.

The sweep repeats the epochs for each λ of Eq. 7. Prints JSON, writes ``<out>.json`` and ``<out>.png`` (probe grid:
rows = states, columns = c' probes and the plain prompt at fixed seeds; concept rate vs epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from toy_common import paired_distances  # noqa: E402

from rece_lightning import RECEModule, diffusion  # noqa: E402
from rece_lightning.toyworld import COLOURS, OBJECT_COLOURS, SHAPES, TEXTURES, ToyWorldScorer, predict  # noqa: E402
from rece_lightning.toyworld.measure import accuracy, combination_prompts, generate  # noqa: E402

FIGURE_COLUMNS = 8  # probe and prompt images per state in the figure


def prompt_set(colours, per_combination: int, seed: int):
    """Prompts, seeds and labels, ordered so that every prefix covers all shape x texture combinations evenly."""
    rows = combination_prompts(colours=colours, images_per_combination=per_combination)
    order = sorted(range(len(rows)), key=lambda i: (i % per_combination, i))
    return [rows[i][0] for i in order], [seed + i for i in order], [rows[i][1] for i in order]


class StateMeter:
    """Generates and scores the report's image sets for one model state."""

    def __init__(self, pipeline, concept: str, args) -> None:
        self.pipeline, self.concept, self.args = pipeline, concept, args
        self.scorer = ToyWorldScorer([concept])
        per = max(1, -(-args.images // (len(SHAPES) * len(TEXTURES))))  # >= args.images concept images
        self.concept_set = prompt_set([concept], per, seed=10_000)
        others = [c for c in COLOURS if c != concept]
        self.other_set = prompt_set(others, args.other_images_per_combination, seed=20_000)
        self.probe_seeds = list(range(args.probes))
        self.reference_other: np.ndarray | None = None

    def rate(self, images: np.ndarray) -> float:
        return self.scorer.tally(self.scorer.detect(images))["rate"]

    def guide_rate(self, guide: str) -> float:
        """The concept's rate on images of the guide prompt (same seeds as the concept's prompts)."""
        _, seeds, _ = self.concept_set
        return self.rate(generate(self.pipeline, [guide] * len(seeds), seeds))

    def measure(self, derived: torch.Tensor | None, keep_images: bool = False, images: int | None = None) -> dict:
        prompts, seeds, labels = (column[:images] for column in self.concept_set)
        concept_images = generate(self.pipeline, prompts, seeds)
        other_prompts, other_seeds, other_labels = self.other_set
        other_images = generate(self.pipeline, other_prompts, other_seeds)
        if self.reference_other is None:
            self.reference_other = other_images
        colours = [predict(image).colour for image in concept_images]
        result = {
            "concept_rate_prompts": self.rate(concept_images),
            "concept_images": len(concept_images),
            "other_colour_accuracy": accuracy(other_images, other_labels)["colour"],
            "erased_shape_accuracy": accuracy(concept_images, labels)["shape"],
            "erased_prompts_colours": {
                c: colours.count(c) / len(colours) for c in [*OBJECT_COLOURS, None] if c in colours
            },
            **self._paired(other_images),
        }
        if derived is not None:
            embeds = derived.to(self.pipeline.unet.dtype).unsqueeze(0).repeat(len(self.probe_seeds), 1, 1)
            probes = generate(self.pipeline, seeds=self.probe_seeds, prompt_embeds=embeds)
            result["concept_rate_probes"] = self.rate(probes)
            if keep_images:  # the figure shows the first FIGURE_COLUMNS of each
                result["_probes"] = probes[:FIGURE_COLUMNS]
                result["_prompt"] = concept_images[:FIGURE_COLUMNS]
        return result

    def _paired(self, images: np.ndarray) -> dict:
        distances = paired_distances(images, self.reference_other)
        return {"fid_unrelated": distances["fid"], "lpips_unrelated": distances["lpips"]}


def run(args) -> dict:
    torch.manual_seed(0)
    pipeline = diffusion.load_pipeline(args.model)
    original_kv = {n: w.detach().clone() for n, w in diffusion.kv_weights(pipeline.unet).items()}
    meter = StateMeter(pipeline, args.concept, args)
    started = time.perf_counter()
    report: dict = {
        "model": args.model,
        "concept": args.concept,
        "guide": args.guide,
        "preserve": args.preserve,
        "lamb": args.lamb,
        "preserve_scale": args.preserve_scale,
        "sampling": "DDIM, 20 steps, guidance 5, 32 px (the toy model's defaults)",
        "states": {},
        "sweep": {},
    }
    grid: dict[str, dict] = {}

    def module_for(reg: float) -> RECEModule:
        diffusion.write_kv_weights(pipeline.unet, original_kv)
        module = RECEModule(
            pretrained_model_name_or_path=args.model,
            erase_concepts=[args.concept],
            guide_concepts=args.guide,
            preserve_concepts=args.preserve or None,
            lamb=args.lamb,
            preserve_scale=args.preserve_scale,
            reg=reg,
        )
        module.attach_pipeline(pipeline)
        return module

    main = module_for(args.reg)
    measured = meter.measure(main.derived_embeddings()[args.concept], keep_images=True)
    measured["guide_concept_rate"] = meter.guide_rate(args.guide)
    grid["original"] = measured
    report["states"]["original"] = _public(measured)
    for reg in [args.reg, *[r for r in args.sweep if r != args.reg]]:
        module = module_for(reg)
        module.apply_uce()
        curve = {}
        for epoch in range(args.epochs + 1):
            if epoch:
                module.derive_and_erase(module.concepts)
            main_curve = reg == args.reg
            measured = meter.measure(
                module.derived_embeddings()[args.concept],
                keep_images=main_curve,
                images=None if main_curve else args.sweep_images,
            )
            name = "uce" if epoch == 0 else f"epoch_{epoch}"
            curve[name] = _public(measured)
            if reg == args.reg:
                grid[name] = measured
            print(f"reg={reg:g} {name}: {json.dumps(_short(curve[name]))}", file=sys.stderr, flush=True)
        report["sweep"][f"{reg:g}"] = curve
        if reg == args.reg:
            report["states"].update(curve)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["summary"] = _summary(report, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    _figure(grid, report, args, Path(f"{args.out}.png"))
    return report


def _public(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if not k.startswith("_")}


def _short(entry: dict) -> dict:
    keys = ("concept_rate_prompts", "concept_rate_probes", "other_colour_accuracy", "erased_shape_accuracy")
    return {k: round(entry[k], 3) for k in keys if k in entry}


def _summary(report: dict, args) -> dict:
    states = report["states"]
    original = states["original"]
    first_clean = next(
        (name for name, s in states.items() if name != "original" and s.get("concept_rate_probes", 1) == 0), None
    )
    return {
        "concept_rate_before": original["concept_rate_prompts"],
        "guide_concept_rate": original["guide_concept_rate"],
        "concept_rate_after_uce": states["uce"]["concept_rate_prompts"],
        "probe_rate_after_uce": states["uce"]["concept_rate_probes"],
        "first_state_with_clean_probes": first_clean,
        "at_first_clean_state": _short(states[first_clean]) if first_clean else None,
        "other_colour_accuracy_before": original["other_colour_accuracy"],
    }


def _figure(grid: dict, report: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grid)
    rows = [
        np.concatenate([*grid[n]["_probes"], np.full((32, 4, 3), 255, np.uint8), *grid[n]["_prompt"]], axis=1)
        for n in names
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    left.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
    left.set_yticks([16 + 32 * i for i in range(len(names))], names)
    columns = len(grid[names[0]]["_probes"])
    half = columns * 32
    left.set_xticks([half / 2, half + 4 + half / 2], [f"c' probes (seeds 0-{columns - 1})", "prompts with the concept"])
    left.set_title(f"Erasing '{args.concept}' (guide {args.guide!r}, λ={args.reg:g})")
    for reg, curve in report["sweep"].items():
        epochs = list(range(len(curve)))
        right.plot(epochs, [c["concept_rate_probes"] for c in curve.values()], marker="o", label=f"c' probes, λ={reg}")
        if float(reg) == args.reg:
            right.plot(
                epochs, [c["concept_rate_prompts"] for c in curve.values()], "k--", marker="s", label="concept prompts"
            )
            right.plot(
                epochs,
                [c["other_colour_accuracy"] for c in curve.values()],
                "g:",
                marker="^",
                label="other colours' accuracy",
            )
    right.axhline(report["states"]["original"]["concept_rate_prompts"], color="grey", lw=0.8)
    right.axhline(
        report["states"]["original"]["guide_concept_rate"],
        color="purple",
        lw=0.8,
        ls="-.",
        label=f"guide {args.guide!r} itself",
    )
    right.set_xlabel("state (0 = after UCE, k = after k RECE epochs)")
    right.set_ylabel(f"share of images showing '{args.concept}' / accuracy")
    right.set_ylim(-0.03, 1.03)
    right.legend(fontsize=8)
    right.set_title("Concept rate per state")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/toyworld-sd")
    parser.add_argument("--concept", default="red", choices=list(COLOURS))
    parser.add_argument("--guide", default=" ")
    parser.add_argument("--preserve", nargs="*", default=[])
    parser.add_argument("--lamb", type=float, default=0.1, help="λ2 of Eq. 2")
    parser.add_argument("--preserve-scale", type=float, default=0.1, help="λ1 of Eq. 2")
    parser.add_argument("--reg", type=float, default=0.1, help="λ of Eq. 7 for the main curve")
    parser.add_argument("--sweep", type=float, nargs="*", default=[1e-3, 1e-2, 0.1, 1.0], help="λ values of Eq. 7")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=200, help="images of the concept's prompts per state")
    parser.add_argument("--sweep-images", type=int, default=48, help="concept images per state for the other λ")
    parser.add_argument("--other-images-per-combination", type=int, default=2)
    parser.add_argument("--probes", type=int, default=24, help="c' probe images per state")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/toy_report")
    args = parser.parse_args(argv)
    if not Path(args.model, "model_index.json").is_file():
        parser.error(f"--model={args.model!r} is not a diffusers pipeline folder (no model_index.json)")
    for name in ("epochs", "images", "sweep_images", "probes", "other_images_per_combination"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    torch.set_num_threads(args.threads)
    report = run(args)
    print(json.dumps({k: report[k] for k in ("summary", "states", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
