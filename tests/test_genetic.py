"""Ring-A-Bell's genetic search, shared by the Ring-A-Bell attack and the prompt search in the loop."""

from __future__ import annotations

import pytest
import torch

from rece_lightning.genetic import check_population, genetic_search


def test_the_search_finds_the_known_best_sequence_and_never_loses_its_best():
    target = torch.tensor([3, 1, 4, 1, 5])

    def mismatches(members: torch.Tensor) -> torch.Tensor:  # 0 only for the target sequence
        return (members != target).sum(dim=1).float()

    result = genetic_search(mismatches, 10, 5, 40, 60, torch.Generator().manual_seed(0))
    assert result.population[0].tolist() == target.tolist() and float(result.scores[0]) == 0.0
    assert result.scores.tolist() == sorted(result.scores.tolist())  # best first
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:], strict=False)) and len(result.losses) == 61
    again = genetic_search(mismatches, 10, 5, 40, 60, torch.Generator().manual_seed(0))
    assert torch.equal(again.population, result.population)  # seeded


def test_a_population_below_four_is_refused_by_name():
    assert check_population(4) == 4
    with pytest.raises(ValueError, match="population=3 is not allowed: the search needs at least 4 prompts"):
        check_population(3)
