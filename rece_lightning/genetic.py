"""Ring-A-Bell's genetic search over fixed-length sequences of choices (tokens, words), lowest score first.

Shared by the Ring-A-Bell attack (fitness: distance to a text-space target) and the prompt search in the loop of
:class:`~rece_lightning.methods.AdversarialRECE` (fitness: K/V distance in the current model). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_POPULATION = 4


def check_population(population: int) -> int:
    """Refuse a population too small for tournaments and an elite; returns it."""
    if population < MIN_POPULATION:
        raise ValueError(f"population={population} is not allowed: the search needs at least {MIN_POPULATION} prompts")
    return population


@dataclass(frozen=True)
class SearchResult:
    """The last generation, best first: ``population`` (P, length) choice indices, their ``scores``, and the best
    score before each generation and after the last (``losses``, never increasing: the elite is kept)."""

    population: Tensor
    scores: Tensor
    losses: list[float]


def genetic_search(
    fitness: Callable[[Tensor], Tensor],
    choices: int,
    length: int,
    population: int,
    generations: int,
    generator: torch.Generator,
    crossover_rate: float = 0.5,
    mutation_rate: float = 0.25,
) -> SearchResult:
    """Elitism (the best tenth kept), tournament selection (the better of two, twice per child), one-point crossover
    at ``crossover_rate``, per-position mutation at ``mutation_rate``; ``fitness`` scores (N, length) index tensors in
    ``[0, choices)``, lower is better."""
    members = torch.randint(choices, (population, length), generator=generator)
    scores = fitness(members)
    losses: list[float] = []
    elite = max(1, population // 10)
    children = population - elite
    for _ in range(generations):
        order = scores.argsort()
        members, scores = members[order], scores[order]
        losses.append(float(scores[0]))
        pairs = torch.randint(population, (children, 2, 2), generator=generator)
        parents = pairs.min(dim=-1).values  # lower index = lower score after sorting
        first, second = members[parents[:, 0]], members[parents[:, 1]]
        cut = torch.randint(1, max(length, 2), (children, 1), generator=generator)
        crossed = torch.where(torch.arange(length) < cut, first, second)
        mix = torch.rand(children, 1, generator=generator) < crossover_rate
        offspring = torch.where(mix, crossed, first)
        mutate = torch.rand(children, length, generator=generator) < mutation_rate
        offspring = torch.where(mutate, torch.randint(choices, (children, length), generator=generator), offspring)
        members = torch.cat([members[:elite], offspring])
        scores = torch.cat([scores[:elite], fitness(offspring)])
    order = scores.argsort(stable=True)  # the first of equal scores first, as argmin picks it
    losses.append(float(scores[order[0]]))
    return SearchResult(members[order], scores[order], losses)
