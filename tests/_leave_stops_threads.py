"""Run under torchrun: leaving the group stops gloo's threads, even after torch.distributed.nn is imported."""

import os

import torch

from astkit import distributed


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


before = threads()
distributed.init(torch.device("cpu"))
import torch.distributed.nn.functional  # noqa: E402,F401  (as torch does lazily: torch.optim -> torch._dynamo)

tensor = torch.ones(3)
torch.distributed.all_reduce(tensor)
assert tensor.tolist() == [2.0, 2.0, 2.0]
del tensor
distributed.leave()
assert threads() == before, f"{threads() - before} threads of the process group outlived leave()"
