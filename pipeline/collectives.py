"""What processes of a multi-process run exchange, through ``ignite.distributed`` (``idist``); each function is the
identity in a one-process run, so code calling them needs no branch of its own.

A process group exists while a ``torchrun`` training runs (:mod:`pipeline.distributed`); every function here that
communicates must then be called by all processes, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

import ignite.distributed as idist
import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes of the current group (1 without one)."""
    return idist.get_world_size()


def rank() -> int:
    """This process's rank in the current group (0 without one)."""
    return idist.get_rank()


def gather_in_rank_order(items: list) -> list:
    """Every process's ``items`` (a list of picklable objects, possibly empty), concatenated in rank order.

    With contiguous chunks of a sequence per process (:func:`pipeline.data.sharding.chunk`), the result is in the
    sequence's order. Tensors should be on the CPU.

    >>> gather_in_rank_order([1, 2])  # one process
    [1, 2]
    """
    if world_size() < 2:
        return list(items)
    parts = idist.all_gather(list(items))
    return [item for part in parts for item in part]


def gather_values(value) -> list:
    """``[value of rank 0, value of rank 1, …]`` for a picklable ``value``."""
    return gather_in_rank_order([value])


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every process (e.g. a generated run name)."""
    if world_size() < 2:
        return text
    return str(idist.broadcast(str(text), src=0))


def mean_across(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over processes of each value (every process must pass the same keys)."""
    if world_size() < 2 or not values:
        return dict(values)
    keys = sorted(values)
    sums = idist.all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                                         device=idist.device()))
    return {k: float(v) / world_size() for k, v in zip(keys, sums.cpu())}


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over processes of ``values`` (a tensor of the same shape in every process), in
    float64 on the tensor's device; ``values`` itself without a group.

    >>> sum_across(torch.tensor([1.0, 2.0]))
    tensor([1., 2.], dtype=torch.float64)
    """
    values = values.detach().to(torch.float64)
    if world_size() < 2:
        return values
    return idist.all_reduce(values.to(idist.device())).to(values.device)


@torch.no_grad()
def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers (e.g. batch-norm running statistics) into every process's ``module``.

    DDP keeps the parameters equal and copies rank 0's buffers at each forward, but the last training forward of a
    process updates its own running statistics; evaluating rank 0's state everywhere makes every process score the
    weights rank 0 saves.
    """
    if world_size() < 2:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    """Wait for every process (nothing without a group)."""
    if world_size() > 1:
        idist.barrier()
