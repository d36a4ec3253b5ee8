"""What the toy-world benchmarks share: the model, the erased states (original / UCE / RECE at the state the selector
picks), image sets with their labels, and rates with 95 % Wilson intervals.

Every benchmark erases with the project's own ``RECEModule`` on one pipeline loaded once (the base K/V restored before
each method), picks RECE's state as ``configs/toy.yaml``'s selector does (the first state whose derived-embedding
probes show none of the erased concepts, else the fewest, earliest on ties) and measures each state with the toy
world's detectors at the model's default sampler (DDIM 20 steps, guidance 5, 32 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without installing

from rece_lightning import RECEModule, diffusion  # noqa: E402
from rece_lightning.evaluation import image_measures as image_metrics  # noqa: E402
from rece_lightning.evaluation.features import RandomConvFeatures  # noqa: E402
from rece_lightning.evaluation.statistics import rate_with_interval  # noqa: E402
from rece_lightning.methods import RECE  # noqa: E402
from rece_lightning.toyworld import ToyWorldScorer, predict  # noqa: E402
from rece_lightning.toyworld.measure import generate  # noqa: E402

MODEL = REPO / "models" / "toyworld-sd"
METHODS = ("original", "uce", "rece")


def parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options every toy benchmark has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL), help="a toy-world pipeline folder")
    parser.add_argument("--out", default=out, help="writes <out>.json, <out>.md and <out>.png")
    parser.add_argument("--max-epochs", type=int, default=5, help="RECE epochs at most (the selector stops earlier)")
    parser.add_argument("--probes", type=int, default=24, help="derived-embedding probe images per state")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, positive: Sequence[str] = ()
) -> argparse.Namespace:
    """Parse and check the arguments before any model is loaded."""
    args = parser.parse_args(argv)
    if not Path(args.model, "model_index.json").is_file():
        parser.error(f"--model={args.model!r} is not a diffusers pipeline folder (no model_index.json there)")
    for name in ("max_epochs", "probes", "threads", *positive):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def rate(hits: Sequence[bool] | np.ndarray) -> dict:
    """A share of images with its 95 % Wilson interval."""
    hits = np.asarray(hits, dtype=bool)
    return rate_with_interval(int(hits.sum()), int(hits.size))


def show(entry: dict) -> str:
    """ "12.5 % [4.3, 31.0]"."""
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.1f} % [{100 * low:.0f}, {100 * high:.0f}]"


@dataclass
class ImageSet:
    """Prompts with their seeds and ground-truth labels."""

    prompts: list[str]
    seeds: list[int]
    labels: list[dict[str, str]]

    @classmethod
    def of(cls, rows: Sequence[tuple[str, dict[str, str]]], seed: int, repeats: int = 1) -> ImageSet:
        rows = [row for _ in range(repeats) for row in rows]
        return cls([p for p, _ in rows], [seed + i for i in range(len(rows))], [labels for _, labels in rows])

    def where(self, **wanted: str | Callable[[str], bool]) -> ImageSet:
        def keep(labels: dict[str, str]) -> bool:
            return all(v(labels[k]) if callable(v) else labels[k] == v for k, v in wanted.items())

        chosen = [i for i, labels in enumerate(self.labels) if keep(labels)]
        return ImageSet(
            [self.prompts[i] for i in chosen], [self.seeds[i] for i in chosen], [self.labels[i] for i in chosen]
        )

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class State:
    """One method's erased state: the recipe that reaches it (replayed by :meth:`Lab.apply`) and how it was reached."""

    method: str
    concepts: tuple[str, ...]
    guide: str
    hyper: dict
    seconds: float = 0.0
    record: dict = field(default_factory=dict)


class Lab:
    """One toy pipeline, the original K/V kept aside, and the methods that erase from it."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.pipeline = diffusion.load_pipeline(model)
        self.original_kv = {n: w.detach().clone() for n, w in diffusion.kv_weights(self.pipeline.unet).items()}

    def restore(self) -> None:
        diffusion.write_kv_weights(self.pipeline.unet, self.original_kv)

    def module(
        self, concepts: Sequence[str], guide: str = " ", method=RECE, preserve_concepts=None, **hyper
    ) -> RECEModule:
        """A module erasing ``concepts`` with ``method`` (a method class; ``hyper``: its options)."""
        self.restore()
        module = RECEModule(
            pretrained_model_name_or_path=self.model,
            erase_concepts=list(concepts),
            guide_concepts=guide,
            preserve_concepts=preserve_concepts,
            method=method(**hyper),
        )
        module.attach_pipeline(self.pipeline)
        return module

    def probe_rate(self, module: RECEModule, scorer: ToyWorldScorer, probes: int) -> float:
        """Share of c' probe images (every concept's, seeds 0..probes-1) showing any erased concept."""
        found = []
        for derived in module.derived_embeddings().values():
            embeds = derived.float().unsqueeze(0).repeat(probes, 1, 1)
            images = generate(self.pipeline, seeds=list(range(probes)), prompt_embeds=embeds)
            found += [bool(d) for d in scorer.detect(images)]
        return float(np.mean(found))

    def states(
        self,
        concepts: Sequence[str],
        guide: str = " ",
        *,
        max_epochs: int,
        probes: int,
        fixed_epochs: bool = False,
        **hyper,
    ) -> dict[str, State]:
        """original, UCE alone and RECE at the selector's state (each timed: the edit only, not the probes);
        ``fixed_epochs``: RECE after all ``max_epochs`` rounds, as the paper's fixed epoch counts (no early stop)."""
        scorer = ToyWorldScorer(list(concepts))
        recipe = (tuple(concepts), guide, hyper)
        states = {"original": State("original", *recipe)}
        started = time.perf_counter()
        module = self.module(concepts, guide, **hyper)
        module.apply_uce()
        uce_seconds = time.perf_counter() - started
        states["uce"] = State("uce", *recipe, uce_seconds, {"probe_rate": self.probe_rate(module, scorer, probes)})
        rates, seconds = [], [uce_seconds]
        for _ in range(max_epochs):
            started = time.perf_counter()
            module.derive_and_erase(module.concepts)
            seconds.append(seconds[-1] + time.perf_counter() - started)
            rates.append(self.probe_rate(module, scorer, probes))
            if rates[-1] == 0.0 and not fixed_epochs:  # stop_when_clean
                break
        selected = max_epochs if fixed_epochs else min(range(len(rates)), key=lambda i: (rates[i], i)) + 1
        record = {
            "selected_epoch": selected,
            "probe_rate_by_epoch": rates,
            "probe_rate_after_uce": states["uce"].record["probe_rate"],
        }
        states["rece"] = State("rece", *recipe, seconds[selected], record)
        return states

    def apply(self, state: State) -> RECEModule | None:
        """Write ``state``'s K/V into the pipeline (the closed form is deterministic: replayed, not stored); the module
        that holds it (None for the original)."""
        if state.method == "original":
            self.restore()
            return None
        module = self.module(state.concepts, state.guide, **state.hyper)
        module.apply_uce()
        for _ in range(state.record.get("selected_epoch", 0)):
            module.derive_and_erase(module.concepts)
        return module

    def images(self, image_set: ImageSet) -> np.ndarray:
        return generate(self.pipeline, image_set.prompts, image_set.seeds)


def hits(images: np.ndarray, labels: Sequence[dict[str, str]], attribute: str) -> np.ndarray:
    """Whether each image's detected ``attribute`` is the labelled one."""
    return np.array(
        [getattr(predict(image), attribute) == label[attribute] for image, label in zip(images, labels, strict=True)]
    )


def shows(images: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Whether the toy detector finds any of ``classes`` in each image."""
    return np.array([bool(found) for found in ToyWorldScorer(list(classes)).detect(images)])


def paired_distances(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """FID and LPIPS of ``images`` against the original model's images of the same prompts and seeds, over a seeded
    random CNN (no Inception / AlexNet weights offline): comparable within one report only."""
    as_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    fid = image_metrics.frechet_inception_distance(RandomConvFeatures(for_fid=True))
    fid.update(as_tensor(reference), real=True)
    fid.update(as_tensor(images), real=False)
    lpips = image_metrics.PairedLPIPS(RandomConvFeatures())
    lpips.update(image_metrics.as_float_images(images), image_metrics.as_float_images(reference))
    return {"fid": float(fid.compute()), "lpips": float(lpips.compute())}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def write(out: str, report: dict, table: str, figure: Callable[[Path], None] | None = None) -> None:
    """``<out>.json`` (the report), ``<out>.md`` (the table), ``<out>.png``; prints the JSON."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{out}.md").write_text(table)
    if figure is not None:
        figure(Path(f"{out}.png"))
    print(json.dumps(report, indent=2))
    print(table)


def grid(rows: dict[str, np.ndarray], path: Path, title: str) -> None:
    """A PNG of image rows (one row per state), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    picture = np.concatenate([np.concatenate(list(rows[n]), axis=1) for n in names], axis=0)
    figure, axis = plt.subplots(figsize=(1 + 0.5 * len(rows[names[0]]), 0.6 + 0.55 * len(names)))
    axis.imshow(picture, interpolation="nearest")
    axis.set_yticks([16 + 32 * i for i in range(len(names))], names)
    axis.set_xticks([])
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def attribute_erasure(args, attribute: str, value: str, title: str) -> None:
    """Erase one shape or texture (guide ``args.guide``) and measure, for original / UCE / RECE: the attribute's
    accuracy on the erased value's named prompts and on the other values' (LPIPS_e / LPIPS_u of each against the
    original model's images of the same prompts and seeds), the erased value's rate on its own prompts."""
    from rece_lightning.toyworld import SHAPES, TEXTURES
    from rece_lightning.toyworld.measure import combination_prompts, shape_synonym_prompts

    values = {"shape": SHAPES, "texture": TEXTURES}[attribute]
    others = [v for v in values if v != value]
    per = {"shape": 3, "texture": 1}[attribute]  # 72 images of the erased shape's prompts, 40 of the texture's
    erased_rows = combination_prompts(**{f"{attribute}s": [value]}, images_per_combination=per)
    other_rows = combination_prompts(**{f"{attribute}s": others}, images_per_combination=1)
    erased = ImageSet.of(erased_rows, seed=30_000)
    other = ImageSet.of(other_rows, seed=31_000)
    sets = {"erased": erased, "other": other}
    if attribute == "shape":  # the erased shape said by its synonyms ("a pyramid" for a triangle)
        sets["synonyms"] = ImageSet.of([r for r in shape_synonym_prompts(4) if r[1]["shape"] == value], seed=32_000)
    lab = Lab(args.model)
    states = lab.states([value], args.guide, max_epochs=args.max_epochs, probes=args.probes, reg=args.reg)
    report = {"model": args.model, attribute: value, "guide": args.guide, "reg": args.reg, "methods": {}}
    references: dict[str, np.ndarray] = {}
    pictures = {}
    for name, state in states.items():
        lab.apply(state)
        entry = {}
        for part, image_set in sets.items():
            images = lab.images(image_set)
            references.setdefault(part, images)
            entry[f"{part}_accuracy"] = rate(hits(images, image_set.labels, attribute))
            entry[f"{part}_lpips"] = paired_distances(images, references[part])["lpips"]
            if part == "erased":
                pictures[name] = images[:16]
        entry.update(erasure_seconds=round(state.seconds, 3), **state.record)
        report["methods"][name] = entry
    methods = report["methods"]

    def row(label: str, key: str) -> list[str]:
        return [label, *(show(methods[m][key]) for m in METHODS)]

    rows = [
        row(f"{attribute} accuracy, '{value}' prompts ({len(erased)})", "erased_accuracy"),
        row(f"{attribute} accuracy, other {attribute}s ({len(other)})", "other_accuracy"),
    ]
    if "synonyms" in sets:
        rows.append(row(f"'{value}' said by a synonym ({len(sets['synonyms'])})", "synonyms_accuracy"))
    rows += [
        [f"LPIPS_e ('{value}' prompts, random CNN)", *(f"{methods[m]['erased_lpips']:.3f}" for m in METHODS)],
        [f"LPIPS_u (other {attribute}s, random CNN)", *(f"{methods[m]['other_lpips']:.3f}" for m in METHODS)],
        ["erasure time (s)", "–", *(f"{methods[m]['erasure_seconds']:.2f}" for m in METHODS[1:])],
    ]
    table = markdown_table(["", *METHODS], rows)
    caption = f"{title}: '{value}' prompts; RECE at epoch {methods['rece']['selected_epoch']}"
    write(args.out, report, table, lambda path: grid(pictures, path, caption))
