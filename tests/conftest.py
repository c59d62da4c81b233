"""Shared fixtures: the embedded digits data and a tiny, fast protocol."""

from __future__ import annotations

import pytest

from astkit.config import RunConfig

#: A protocol small enough for a test: seconds on 2 CPU cores.
TINY = [
    "model.width=8",
    "experts.num_experts=2",
    "experts.epochs=4",
    "experts.batch_size=128",
    "distill.ipc=2",
    "distill.iterations=3",
    "distill.syn_steps=4",
    "distill.expert_epochs=2",
    "distill.max_start_epoch=2",
    "distill.lr_img=100",
    "distill.checkpoint_every=2",
    "evaluate.epochs=10",
    "evaluate.num_nets=1",
]


def tiny_config(tmp_path, *overrides: str) -> RunConfig:
    return RunConfig.load(overrides=[*TINY, f"out={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="session")
def digits():
    from astkit.data import load_dataset

    return load_dataset("digits")
