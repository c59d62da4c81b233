"""Balanced inner-loop loss (AST, Sec. IV-C2, eq. 20).

The start epoch is random, so the student's inner loss is large when it
starts early (an unconverged expert) and small when it starts late. AST
multiplies the inner cross-entropy by

    nu = log_b(start - middle + vartheta)        if start >= middle
    nu = 1 / log_b(middle - start + vartheta)    if start <  middle

with ``middle = max_start_epoch // 2``: early starts are damped, late ones
amplified. Paper: vartheta = 8, natural log; authors' code: base 5.
"""

from __future__ import annotations

import math

from astkit import UserError, hookimpl

NAME = "balanced-inner-loss"
VARIANTS = {"paper": {"vartheta": 8.0, "base": math.e}, "reference": {"vartheta": 8.0, "base": 5.0}}


def balanced_weight(start: int, max_start_epoch: int, vartheta: float = 8.0, base: float = math.e) -> float:
    """AST's nu(start) (eq. 20)."""
    middle = max_start_epoch // 2
    if start >= middle:
        return math.log(start - middle + vartheta, base)
    return 1.0 / math.log(middle - start + vartheta, base)


@hookimpl
def astkit_plugin_options():
    return {NAME: {"variant": "paper", "vartheta": None, "base": None}}


@hookimpl
def astkit_inner_loss_weight(start_epoch, max_start_epoch, config):
    options = config.plugin(NAME)
    preset = VARIANTS[_variant(options)]
    vartheta = float(options["vartheta"] if options["vartheta"] is not None else preset["vartheta"])
    base = float(options["base"] if options["base"] is not None else preset["base"])
    return balanced_weight(start_epoch, max_start_epoch, vartheta, base)


def _variant(options) -> str:
    if options["variant"] not in VARIANTS:
        raise UserError(f"{NAME}.variant must be one of {', '.join(VARIANTS)}, got {options['variant']!r}")
    return options["variant"]
