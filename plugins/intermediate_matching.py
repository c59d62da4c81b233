"""Intermediate matching loss (AST, Sec. IV-D, eq. 22).

Besides MTT's final term (student after N steps against the expert M
epochs on), AST matches the student at the intermediate steps
``xi_i = floor(i * N / M)`` against the expert ``i`` epochs on, for
``i = 1 .. M-1``, and sums the normalised distances with weights beta_i:
equal (``beta_i = 1``, the paper's choice) or varied (``beta_i = i / M``).
"""

from __future__ import annotations

from astkit import MatchPoint, UserError, hookimpl

NAME = "intermediate-matching"


def matching_points(syn_steps: int, expert_epochs: int, beta: str = "equal") -> list[MatchPoint]:
    """The points ``(xi_i, i, beta_i)`` for ``i = 1..M``, with ``xi_M = N``."""
    if beta not in ("equal", "varied"):
        raise UserError(f"{NAME}.beta must be 'equal' or 'varied', got {beta!r}")
    n, m = syn_steps, expert_epochs
    points = []
    for i in range(1, m + 1):
        step = n if i == m else (i * n) // m
        if step < 1:
            continue  # fewer student steps than expert epochs: skip empty points
        points.append(MatchPoint(step, i, 1.0 if beta == "equal" else i / m))
    return points


@hookimpl
def astkit_plugin_options():
    return {NAME: {"beta": "equal"}}


@hookimpl
def astkit_matching_schedule(syn_steps, expert_epochs, config):
    return matching_points(syn_steps, expert_epochs, config.plugin(NAME)["beta"])
