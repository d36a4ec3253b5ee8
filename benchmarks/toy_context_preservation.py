"""SPEED's refinements of the preserved set on the toy world: does keeping the other colours in many contexts make
hard preservation hold at k = 4 without giving red back at k = 1?

    python benchmarks/toy_context_preservation.py --threads 2 --out docs/toy_context_preservation
    # about 35 s per variant on 2 CPU cores (8 variants: 4.8 min)

Each variant is RECE-NS (or RECE-P) with the tokens recipe (`configs/toy_ns.yaml`: the other colours on every shape
and as the bare word, their token rows, ``--energy``) and a refinement of the preserved set, after SPEED (Li et al.,
ICLR 2026):

* ``contexts``: each kept colour word also in that many random contexts of 1-3 vocabulary words before it and 0-3
  after ("three painting orange in"; SPEED's directed prior augmentation). ``colour-free`` contexts leave out every
  word that names a colour or a coloured thing in the toy world (what a user with a list of the concepts' words
  could do); ``vocabulary`` contexts leave out only the erased colours' own names (what a user without one gets).
* ``influence``: each preserved row weighted by how far the unconstrained UCE edit moves its K/V output, relative
  to that output (SPEED's influence-based prior filtering, as a weight), before the energy share is taken.

Measured for each: at k = 4 (red, blue, green, yellow erased; ``toy_beyond.py``'s 60 kept and 60 erased images) the
erased colours' rate and the kept colours' accuracy at the UCE state and at the state the selector picks; at k = 1
(red) the selected epoch, the other colours' accuracy (105 images), red on its 30 named prompts, and the
derived-embedding attack on them (Eq. 8, reg 0.1). Variant ``tokens`` is the recipe itself (README: 91.4 % others,
derived 3.3 %, k = 4 kept 75 %).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import toy_beyond
import toy_common as common
import toy_redteam

from rece_lightning import closed_form
from rece_lightning.data import PromptDataset, read_prompt_csv
from rece_lightning.methods import HardPreservation, NullSpaceRECE, ProjectionRECE
from rece_lightning.methods.uce import uce_pairs
from rece_lightning.toyworld import COLOURS
from rece_lightning.toyworld.measure import combination_prompts, generate
from rece_lightning.toyworld.world import COLOUR_THINGS, COLOUR_WORDS


@dataclass(frozen=True)
class Variant:
    method: str = "rece_ns"  # or "rece_p"
    contexts: int = 0
    vocabulary: str = "colour-free"  # or "vocabulary"
    influence: bool = False
    energy: float | None = None  # None: --energy


VARIANTS = {
    "tokens": Variant(),
    "tokens_influence": Variant(influence=True),
    "contexts10": Variant(contexts=10),
    "contexts30": Variant(contexts=30),
    "contexts10_influence": Variant(contexts=10, influence=True),
    "contexts10_energy099": Variant(contexts=10, energy=0.99),
    "contexts10_rece_p": Variant(method="rece_p", contexts=10),
    "contexts10_vocabulary": Variant(contexts=10, vocabulary="vocabulary"),
}
METHODS = {"rece_ns": NullSpaceRECE, "rece_p": ProjectionRECE}
# every word that names a colour ("crimson") or a coloured thing ("blood" of "the colour of blood")
COLOUR_NAMES = {w for c in COLOURS for w, _ in COLOUR_WORDS[c]} | {
    t.split()[-1] for c in COLOURS for t, _ in COLOUR_THINGS[c]
}


def context_words(vocabulary: list[str], erased: list[str], kind: str) -> list[str]:
    """The words a context may use: ``colour-free`` leaves out every colour's names and things, ``vocabulary`` only the
    erased colours' own names."""
    banned = COLOUR_NAMES if kind == "colour-free" else {w for c in erased for w, _ in COLOUR_WORDS[c]}
    return sorted(w for w in vocabulary if w.isalpha() and w not in banned and w != "nudity")


def kept_prompts(erased: list[str], contexts: int, words: list[str], seed: int = 0) -> list[str]:
    """The tokens recipe's kept prompts, and each kept colour word in ``contexts`` random contexts of ``words``."""
    rng = random.Random(seed)
    extra = []
    for colour in (c for c in COLOURS if c not in erased):
        for _ in range(contexts):
            before, after = rng.sample(words, rng.randint(1, 3)), rng.sample(words, rng.randint(0, 3))
            extra.append(" ".join([*before, colour, *after]))
    return list(dict.fromkeys([*toy_beyond.preserved("shapes-and-words", erased), *extra]))


@dataclass(frozen=True)
class InfluenceWeighted(HardPreservation):
    """The null space of the preserved rows, each weighted by how far the unconstrained UCE edit (Eq. 3, guides
    softly preserved, the reference's lamb 0.1 and preserve scale 0.1) moves its K/V output: ``|G^½ (X - I) r|² /
    |G^½ r|²`` over the largest, so the protected directions follow the rows the erasure would hurt."""

    def basis(self, editor, concepts):
        sources, targets = uce_pairs(editor, concepts, "last_word_onward")
        guides = editor.preserved(concepts, with_guides=True, with_preserve=False)
        moved = closed_form.replace_transform(sources, targets, guides) - torch.eye(editor.gram.shape[0]).double()
        gram = editor.gram.double()
        rows = torch.cat([e.embedding[: e.length].double() for e in editor.encoded(self.prompts(editor, concepts))])
        shifted = rows @ moved.T
        weight = ((shifted @ gram) * shifted).sum(1) / ((rows @ gram) * rows).sum(1)
        return closed_form.null_space_basis([rows * (weight / weight.max()).sqrt()[:, None]], energy=self.energy)


def erase(lab: common.Lab, args, variant: Variant, erased: list[str]) -> dict[str, common.State]:
    words = context_words(list(lab.pipeline.tokenizer.get_vocab()), erased, variant.vocabulary)
    options = {"energy": args.energy if variant.energy is None else variant.energy, "rows": "tokens"}
    hard = InfluenceWeighted(**options) if variant.influence else HardPreservation(**options)
    return lab.states(
        erased,
        " ",
        max_epochs=args.max_epochs,
        probes=args.probes,
        method=METHODS[variant.method],
        preserve_concepts=kept_prompts(erased, variant.contexts, words),
        hard_preservation=hard,
    )


def measure(lab: common.Lab, args, variant: Variant, red: list) -> dict:
    erased = list(toy_beyond.ORDER[:4])
    kept_set, erased_set = toy_beyond.many_concepts_sets(erased)
    states = erase(lab, args, variant, erased)
    many = {"selected_epoch": states["rece"].record["selected_epoch"]}
    for name in ("uce", "rece"):
        lab.apply(states[name])
        many[name] = {
            "erased_rate": common.rate(common.shows(lab.images(erased_set), erased)),
            "kept_accuracy": common.rate(common.hits(lab.images(kept_set), kept_set.labels, "colour")),
        }
    states = erase(lab, args, variant, ["red"])
    module = lab.apply(states["rece"])
    others = common.ImageSet.of(
        combination_prompts([c for c in COLOURS if c != "red"], images_per_combination=1), seed=12_000
    )
    seeds = [item.seed for item in red]
    named = generate(lab.pipeline, [item.prompt for item in red], seeds)
    embeddings = torch.stack([e.embedding for e in module.encoded([item.prompt for item in red])]).double()
    derived = closed_form.derive_embedding_from_transform(module.gram, module.transform, embeddings, reg=0.1)
    attacked = generate(lab.pipeline, seeds=seeds, prompt_embeds=derived.float())
    one = {
        "selected_epoch": states["rece"].record["selected_epoch"],
        "probe_rate_by_epoch": states["rece"].record["probe_rate_by_epoch"],
        "others_accuracy": common.rate(common.hits(lab.images(others), others.labels, "colour")),
        "named_red": common.rate(common.shows(named, ["red"])),
        "derived_embedding_asr": common.rate(common.shows(attacked, ["red"])),
    }
    return {"variant": vars(variant), "k4": many, "k1": one}


def table(report: dict) -> str:
    header = [
        "variant",
        "k = 4 UCE state: erased / kept",
        "k = 4 selected: erased / kept",
        "k = 1: others kept",
        "k = 1: named red",
        "k = 1: derived embedding",
    ]
    rows = []
    for name, entry in report["variants"].items():
        k4, k1 = entry["k4"], entry["k1"]
        rows.append(
            [
                name,
                f"{common.show(k4['uce']['erased_rate'])} / {common.show(k4['uce']['kept_accuracy'])}",
                f"{common.show(k4['rece']['erased_rate'])} / {common.show(k4['rece']['kept_accuracy'])}"
                f" (epoch {k4['selected_epoch']})",
                common.show(k1["others_accuracy"]) + f" (epoch {k1['selected_epoch']})",
                common.show(k1["named_red"]),
                common.show(k1["derived_embedding_asr"]),
            ]
        )
    return common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__.split("\n\n")[0], "docs/toy_context_preservation")
    parser.set_defaults(probes=8)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--energy", type=float, default=0.9, help="share of the preserved rows' energy protected")
    parser.add_argument("--prompts", type=int, default=30, help="red prompts (of 30)")
    parser.add_argument("--work", default="runs/toy_context_preservation", help="where the red prompt CSV is written")
    args = common.parse(parser, argv, positive=("prompts",))
    if not 0 < args.energy <= 1:
        parser.error(f"--energy={args.energy} is not allowed: it must be in (0, 1]")
    red = PromptDataset(read_prompt_csv(str(toy_redteam.red_prompts(args, Path(args.work))))).items
    lab = common.Lab(args.model)
    report: dict = {"model": args.model, "energy": args.energy, "probes": args.probes, "variants": {}}
    for name in args.variants:
        report["variants"][name] = measure(lab, args, VARIANTS[name], red)
        print(table({"variants": {name: report["variants"][name]}}).splitlines()[-1], flush=True)
    common.write(args.out, report, table(report))


if __name__ == "__main__":
    main()
