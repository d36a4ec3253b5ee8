"""The attack stage of an evaluation: a red-team attack as the prompt source.

For each prompt and model the stage finds the attack's outcome (in memory, saved beside the image set by an earlier
run, or attacked now), generates that prompt's missing images from the outcome's embedding, counts what the attack
did (summed across processes), and at the end gives the attack's figures and the adversarial-prompt CSVs. It uses the
generation stage and the report stage below it and knows nothing of the evaluator: what it needs of the evaluated
models comes in as arguments (``activate`` writes a model's K/V into the pipeline, ``context`` builds the attack's
view of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import nn
from torchmetrics.aggregation import SumMetric
from tqdm.auto import tqdm

from rece_lightning.attacks.base import AttackContext, AttackOutcome, PromptAttack
from rece_lightning.data import PromptItem
from rece_lightning.evaluation import generation, report

COUNTED = ("attack_prompts", "attack_steps", "attack_checked", "attack_found")


class AttackStage(nn.Module):
    """``attack`` on every prompt of ``variants`` (``original``, ``erased``); an ``nn.Module`` so that its counters
    move to the device and are summed across processes like any torchmetrics state."""

    def __init__(self, attack: PromptAttack, variants: Sequence[str]) -> None:
        super().__init__()
        self.attack = attack
        self.variants = list(variants)
        self.counters = nn.ModuleDict({f"{v}__{n}": SumMetric() for v in self.variants for n in COUNTED})
        self._outcomes: dict[str, dict[int, AttackOutcome]] = {v: {} for v in self.variants}
        self.folders: dict[str, Path] = {}

    def start(self, image_sets: dict[str, generation.ImageSet], tokenizer, dataset, rank: int, world: int, bar: bool):
        """Before the first prompt: every prompt must suit the attack (e.g. room for its tokens); outcomes are kept
        in ``attack_<name>/`` inside each model's image set; a per-prompt progress bar (prompts done, the last
        prompt's steps and best loss: the whole attack may be a single test batch)."""
        for prompt in sorted({item.prompt for item in dataset or ()}):
            self.attack.check_prompt(tokenizer, prompt)
        self.folders = {v: image_sets[v].folder / f"attack_{self.attack.name}" for v in self.variants}
        self._outcomes = {v: {} for v in self.variants}
        cases = list(dict.fromkeys(item.case_number for item in dataset)) if dataset is not None else []
        self._progress = tqdm(
            total=len(cases[rank::world]) * len(self.variants),
            desc=f"{self.attack.name} attack (prompt x model)",
            unit="prompt",
            leave=False,
            disable=not bar,
        )

    def outcome(
        self,
        variant: str,
        items: Sequence[PromptItem],
        size: tuple[int, int],
        context: Callable[[str], AttackContext],
        activate: Callable[[str], None],
        stop_if_asked: Callable[[], None],
    ) -> AttackOutcome:
        """The attack's outcome for the prompt of ``items`` on ``variant``: in memory, on disk, or attacked now."""
        case, key = items[0].case_number, items[0].prompt_key
        known = self._outcomes[variant].get(case)
        if known is not None:
            return known
        folder = self.folders[variant]
        outcome = AttackOutcome.load(folder, key)
        if outcome is None and self.attack.model_agnostic:  # one search serves every model
            outcome = next((o[case] for o in self._outcomes.values() if case in o), None)
        if outcome is None:
            stop_if_asked()
            activate(variant)
            outcome = self.attack.attack(context(variant), items, *size)
            activate(variant)
        if not (folder / f"{key}.json").is_file():
            outcome.save(folder, case, key)
        self._progress.update(1)
        best = f"{min(outcome.losses):.4g}" if outcome.losses else "-"
        self._progress.set_postfix({"model": variant, "steps": outcome.steps, "best loss": best})
        self._outcomes[variant][case] = outcome
        self.counters[f"{variant}__attack_prompts"].update(1.0)
        self.counters[f"{variant}__attack_steps"].update(float(outcome.steps))
        self.counters[f"{variant}__attack_checked"].update(float(outcome.found is not None))
        self.counters[f"{variant}__attack_found"].update(float(bool(outcome.found)))
        return outcome

    def fill_images(
        self,
        variant: str,
        items: list[PromptItem],
        sizes: list[tuple[int, int]],
        images: list[np.ndarray | None],
        write: Callable[[int, np.ndarray], None],
        generate: Callable[[list[PromptItem], list[tuple[int, int]], list], list[np.ndarray]],
        **model: Callable,
    ) -> None:
        """Images from the attack's embedding of each prompt where ``images`` has none yet (``write`` saves image i;
        ``generate(items, sizes, prompt_embeds)`` makes them; ``model``: ``context``, ``activate``,
        ``stop_if_asked`` as :meth:`outcome` takes them)."""
        by_case: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_case.setdefault(item.case_number, []).append(i)
        for indices in by_case.values():
            outcome = self.outcome(variant, [items[i] for i in indices], sizes[indices[0]], **model)
            todo = [i for i in indices if images[i] is None]
            if not todo:
                continue
            model["activate"](variant)
            generated = generate(
                [items[i] for i in todo], [sizes[i] for i in todo], [outcome.prompt_embeds] * len(todo)
            )
            for i, image in zip(todo, generated, strict=True):
                write(i, image)
                images[i] = image

    def finish(self, results: dict[str, dict], datamodule, output_dir: Path, is_global_zero: bool) -> list:
        """The attack's figures per model (prompts attacked, mean steps, its own success checks) into ``results``,
        the adversarial-prompt CSVs (process 0, from the saved outcomes, once every process has finished), and the
        report's column."""
        self._progress.close()
        for v in self.variants:
            prompts = self.counters[f"{v}__attack_prompts"].compute().item()
            checked = self.counters[f"{v}__attack_checked"].compute().item()
            figures = {
                "attack": self.attack.name,
                "concept": self.attack.concept,
                "settings": self.attack.settings(),
                "prompts_attacked": int(prompts),
                "mean_steps": self.counters[f"{v}__attack_steps"].compute().item() / prompts if prompts else 0.0,
            }
            if checked:
                figures["found_by_own_check"] = int(self.counters[f"{v}__attack_found"].compute().item())
            results[v]["attack"] = figures
            if is_global_zero:
                csv_path = output_dir / f"adversarial_prompts_{self.attack.name}_{v}.csv"
                report.write_adversarial_csv(self.folders[v], datamodule, csv_path)
                figures["adversarial_prompts_csv"] = str(csv_path)
        return [("Attack steps", {v: f"{results[v]['attack']['mean_steps']:.1f}" for v in self.variants})]
