"""The replicated closed-form state and the sharded image generation, on simulated process groups (threads)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rece_lightning.data import PromptDataset, UnpaddedDistributedSampler
from rece_lightning.distributed import check_replicated, sharded_map
from tests.conftest import prompt_frame


class _Strategy:
    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.root_device = group, rank, torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.values[self.rank] = tensor.clone()
        self.group.barrier.wait()
        gathered = torch.stack([self.group.values[r] for r in range(self.group.world)])
        self.group.barrier.wait()  # nobody overwrites a value before everyone has read it
        return gathered


class _Group:
    def __init__(self, world: int) -> None:
        self.world, self.values, self.barrier = world, {}, threading.Barrier(world, timeout=30)


class _Trainer:
    def __init__(self, group: _Group, rank: int) -> None:
        self.world_size, self.global_rank, self.strategy = group.world, rank, _Strategy(group, rank)


def _on_every_rank(world: int, work) -> list:
    """``work(trainer)`` on ``world`` simulated processes at once; their results (or exceptions) by rank."""
    group, results = _Group(world), [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = work(_Trainer(group, rank))
        except Exception as error:  # noqa: BLE001  (returned to the test)
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("world,count", [(3, 7), (4, 2), (2, 5)])
def test_sharded_map_generates_each_item_once_and_every_rank_gets_all_in_order(world, count):
    generated = []

    def work(trainer):
        def generate(indices):
            generated.extend(indices)
            return np.stack([np.full((2, 2, 3), i, dtype=np.float32) for i in indices])

        return sharded_map(trainer, list(range(count)), generate, (2, 2, 3))

    results = _on_every_rank(world, work)
    assert sorted(generated) == list(range(count))  # each once, though count does not divide by world
    for images in results:
        assert images.shape == (count, 2, 2, 3) and images[:, 0, 0, 0].tolist() == list(range(count))


def test_check_replicated_catches_a_state_that_differs_on_one_rank():
    state = torch.eye(3, dtype=torch.float64)
    same = _on_every_rank(3, lambda trainer: check_replicated(trainer, state, "the RECE transform"))
    assert same == [None, None, None]

    def diverging(trainer):
        mine = state.clone()
        if trainer.global_rank == 2:
            mine[0, 1] = 1e-12  # one rounding-sized difference on one rank
        return check_replicated(trainer, mine, "the RECE transform")

    errors = _on_every_rank(3, diverging)
    assert all(isinstance(e, RuntimeError) and "the RECE transform differs between processes" in str(e) for e in errors)


def test_the_prompt_sampler_splits_whole_prompts_when_they_do_not_divide():
    frame = prompt_frame([10, 11, 12, 13, 14])
    dataset = PromptDataset(frame, images_per_prompt=3)
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=2, rank=r)) for r in range(2)]
    cases = [[dataset.items[i].case_number for i in shard] for shard in shards]
    assert cases == [[10] * 3 + [12] * 3 + [14] * 3, [11] * 3 + [13] * 3]  # all images of a prompt on one rank
    assert sorted(i for shard in shards for i in shard) == list(range(15))  # every image exactly once
