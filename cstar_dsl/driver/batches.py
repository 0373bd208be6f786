"""Compile driver, batches: the training batches of an epoch, seeded, shared out across ranks, on the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..train import distributed
from ..train.data import augment, dataset_size, loader_batches
from .state import Context, place


def epoch_seed(seed: int, phase_index: int, epoch: int) -> int:
    """Every source of randomness in an epoch derives from this, so a resumed run repeats it exactly."""
    return seed * 1_000_003 + phase_index * 10_007 + epoch


def batches(context: Context, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's share of each global batch, in an order drawn from ``generator``."""
    train = context.data.train
    size = context.spec.data.batch_size
    order = torch.randperm(dataset_size(train), generator=generator)
    # Every rank draws the same order and takes its share of each global batch.
    shares = [distributed.share(order[start:start + size], context.world) for start in range(0, len(order), size)]
    if isinstance(train, TensorDataset):
        images, labels = train.tensors
        for index in shares:
            batch = images[index]
            if context.spec.data.augment == "standard":
                batch = augment(batch, context.data.name, generator)
            yield place(batch, context.device), labels[index].to(context.device)
        return
    # Folders augment per item, drawing from the global generator: seeded per epoch, so a resumed run
    # sees the same crops. (Each rank's batches are its shares when the batch size divides evenly.)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    local = -(-size // context.world.size)
    for images, labels in loader_batches(train, torch.cat(shares), local, context.spec.data.workers,
                                         generator=generator):
        yield place(images, context.device), labels.to(context.device)
