"""Where Eq. 7's pull towards 0 leads on the toy model: colours drawn from the zero embedding, from shrunken prompt
embeddings, and from c' state by state at several guidance scales.

    python benchmarks/toy_null_embedding.py --out docs/toy_null_embedding.json     # ~2 min on 2 CPU cores

Theorem 1 of the paper pulls the derived embedding c' towards 0 as λ grows; RECE's epochs rely on c' losing the
concept. If the model itself draws the concept from embeddings near 0, c' probes cannot lose it, whatever the epochs do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rece_lightning import RECEModule, diffusion, families
from rece_lightning.toyworld import measure
from rece_lightning.toyworld.detectors import predict

MODEL = Path(__file__).resolve().parents[1] / "models" / "toyworld-sd"


def colour_shares(pipeline, embedding: torch.Tensor, seeds: list[int], guidance: float) -> dict[str, float]:
    batch = embedding.float().unsqueeze(0).repeat(len(seeds), 1, 1)
    images = measure.generate(pipeline, seeds=seeds, prompt_embeds=batch, guidance_scale=guidance)
    colours = [predict(image).colour for image in images]
    return {colour: colours.count(colour) / len(colours) for colour in sorted(set(colours))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--concept", default="red")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.images < 1 or args.epochs < 0:
        parser.error(f"--images={args.images} must be >= 1 and --epochs={args.epochs} >= 0")
    torch.manual_seed(0)
    pipeline = diffusion.load_pipeline(args.model)
    seeds = list(range(args.images))
    blank, concept = (e.embedding for e in families.encode_prompts(pipeline, [" ", args.concept]))
    result: dict = {"model": args.model, "concept": args.concept, "images": args.images, "guidance": {}}
    for guidance in (1.0, 2.0, 5.0):
        row = {
            "zero embedding": colour_shares(pipeline, torch.zeros_like(blank), seeds, guidance),
            "0.5 x blank": colour_shares(pipeline, 0.5 * blank, seeds, guidance),
            "blank ' '": colour_shares(pipeline, blank, seeds, guidance),
            f"prompt '{args.concept}'": colour_shares(pipeline, concept, seeds, guidance),
        }
        result["guidance"][str(guidance)] = row
    module = RECEModule(args.model, erase_concepts=[args.concept], guide_concepts=" ", export_dir=None)
    module.attach_pipeline(pipeline)
    module.apply_uce()
    states = {}
    for state in range(args.epochs + 1):
        derived = module.derived_embeddings()[args.concept]
        states[str(state)] = {
            "c_prime_norm_over_concept_norm": float(derived.norm() / concept.double().norm()),
            **{
                f"{args.concept} at guidance {g}": colour_shares(pipeline, derived, seeds, g).get(args.concept, 0.0)
                for g in (1.0, 2.0, 5.0)
            },
        }
        if state < args.epochs:
            module.derive_and_erase(module.concepts)
    result["c_prime_by_state"] = states
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
