"""A RECE fit on several processes: the closed-form state replicated, the image generation sharded.

A ``RECEModule`` has no trainable parameter, so ``DistributedDataParallel`` refuses to wrap it. Nothing needs
wrapping: every process solves the same d x d systems and holds the same state (checked after every edit). What is
expensive in a fit is generating the probe and validation images for the callbacks; :func:`sharded_map` splits those
across processes and gathers them, so every process sees every image.

``ReplicatedDDPStrategy`` (registered as ``strategy="rece_ddp"``; the CLI picks it for a RECE fit on several devices)
is Lightning's ``DDPStrategy`` without the model wrapper: same launchers, process groups, barriers and collectives,
so ``--trainer.devices``, ``--trainer.num_nodes``, torchrun and SLURM work as for any Lightning run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

__all__ = ["STRATEGY_NAME", "ReplicatedDDPStrategy", "check_replicated", "sharded_map"]

STRATEGY_NAME = "rece_ddp"
T = TypeVar("T")


class ReplicatedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves the LightningModule unwrapped: its state is replicated, not trained."""

    strategy_name = STRATEGY_NAME

    def configure_ddp(self) -> None:
        pass  # no gradients to reduce; every process computes the same closed-form update


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME,
        ReplicatedDDPStrategy,
        description="DDP without the model wrapper, for closed-form modules whose state every process computes",
    )


def _world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def sharded_map(
    trainer, items: Sequence[T], generate: Callable[[list[int]], np.ndarray], image_shape: tuple[int, ...]
) -> np.ndarray:
    """``generate(indices)`` for this process's contiguous share of ``items``, gathered in order on every process.

    ``generate`` returns one array of shape ``(len(indices), *image_shape)`` (float32 images); a process whose share
    is empty still joins the gather. With one process this is ``generate(all indices)``.
    """
    world, rank = _world(trainer)
    count = len(items)
    if world == 1:
        return generate(list(range(count)))
    per = -(-count // world)
    mine = list(range(rank * per, min(count, (rank + 1) * per)))
    local = np.zeros((per, *image_shape), dtype=np.float32)
    if mine:
        local[: len(mine)] = generate(mine)
    gathered = trainer.strategy.all_gather(torch.from_numpy(local).to(trainer.strategy.root_device))
    return gathered.reshape(world * per, *image_shape)[:count].cpu().numpy()


def check_replicated(trainer, tensor: torch.Tensor, what: str) -> None:
    """Refuse to go on if the processes' copies of ``tensor`` differ (they must solve the same systems)."""
    world, _ = _world(trainer)
    if world == 1:
        return
    gathered = trainer.strategy.all_gather(tensor.detach())
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError(f"{what} differs between processes: the closed-form state must be identical on every rank")
