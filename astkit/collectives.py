"""Differentiable collectives for splitting the synthetic batch across ranks.

Under ``torchrun`` each rank computes the student's gradient on its share of
every step's synthetic mini-batch; the shares are summed so that all ranks
take the same SGD step. For the meta-gradient to equal the single-process
one, the two ends of that computation need different collectives:

* the partial gradients are summed in the forward pass and their adjoint is
  passed through unchanged (every rank holds the same adjoint of the summed
  gradient, since every rank computes the same matching loss);
* the replicated student weights enter each rank's partial gradient through
  an identity whose adjoint is summed: ``d/dtheta`` of the summed gradient is
  the sum of every rank's Hessian-vector product.

Images then receive, on each rank, the gradient of the rows that rank
processed; :meth:`BatchShard.sum_` adds them up after ``backward()``. The
student lr's gradient is computed from replicated values only and is already
equal everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from astkit import distributed
from astkit.errors import UserError


class _SumForward(torch.autograd.Function):
    """``all_reduce(SUM)`` forward, identity backward."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SumBackward(torch.autograd.Function):
    """Identity forward, ``all_reduce(SUM)`` backward."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


@dataclass(frozen=True)
class BatchShard:
    """This rank's part of every synthetic mini-batch.

    Rows are split into ``world_size`` contiguous blocks, as even as possible
    (``torch.tensor_split``); rank ``r`` takes block ``r``.
    """

    rank: int
    world_size: int

    @classmethod
    def plan(cls, module: torch.nn.Module, n: int, batch_syn: int | None) -> "BatchShard | None":
        """This rank's share when ``n`` synthetic images are unrolled in mini-batches
        of ``batch_syn`` (None: all) under torchrun; None in a single process.

        Refuses batch norm (its statistics couple the ranks' rows) and a
        mini-batch smaller than the number of processes.
        """
        world = distributed.world_size()
        if world == 1:
            return None
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise UserError(
                "distillation across processes needs a model without batch norm (its statistics couple the "
                "ranks' rows); set model.norm=instancenorm or run distill in one process"
            )
        size = min(batch_syn or n, n)
        batch = min(size, n % size or size)  # MTT's chunks: the last one may be smaller
        if batch < world:
            raise UserError(
                f"distillation across {world} processes needs a synthetic mini-batch of at least {world} "
                f"images, this run has {batch}; raise distill.batch_syn or use fewer processes"
            )
        return cls(distributed.rank(), world)

    def rows(self, n: int) -> slice:
        """The rows of an ``n``-row batch that this rank processes."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    @staticmethod
    def replicated(theta: torch.Tensor) -> torch.Tensor:
        """``theta`` as used by this rank's partial gradient (adjoint summed over ranks)."""
        return _SumBackward.apply(theta)

    @staticmethod
    def summed(partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``partial`` (adjoint passed through)."""
        return _SumForward.apply(partial)

    @staticmethod
    def sum_(tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (not differentiable); return it."""
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s copy in place; return it."""
        dist.broadcast(tensor, src)
        return tensor
