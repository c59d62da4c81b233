"""Shared fixtures: the embedded digits data and a tiny, fast protocol."""

from __future__ import annotations

import signal

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


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_raises_keyboard_interrupt():
    """Tests send real Ctrl-Cs (to this process and to CLI subprocesses). A suite started in the background
    (``cmd &`` without job control) inherits SIGINT ignored, and so would every subprocess; Python's
    default handler makes both behave as at a terminal (an exec resets a handled signal to its default)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
