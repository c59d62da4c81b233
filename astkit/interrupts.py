"""Ctrl-C held back while a block runs, so state is changed whole or not at all."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Run the block to its end even if SIGINT arrives; deliver it afterwards.

    A SIGINT received inside the block is passed on when the block ends (as
    ``KeyboardInterrupt`` under Python's default handler, or to whatever
    handler was installed). Outside the main thread, where handlers cannot be
    set, the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
