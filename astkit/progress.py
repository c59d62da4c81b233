"""How the engine reports progress of its long loops, without printing itself.

The engine calls a :class:`Progress`; the default does nothing. The CLI
passes :class:`astkit.rich_progress.RichProgress`, which draws rich progress bars.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """Receives the start, advance and end of every long loop. No-op base."""

    def start(self, task: str, description: str, total: int) -> None:
        """A loop named ``task`` of ``total`` steps begins."""

    def advance(self, task: str, steps: int = 1, **fields: Any) -> None:
        """``steps`` more steps of ``task`` are done; ``fields`` are key numbers."""

    def stop(self, task: str) -> None:
        """The loop ``task`` ended."""

    def log(self, message: str) -> None:
        """A one-line message worth showing to the user."""
