"""Presets of the built-in plugins."""

from astkit import hookimpl

AST = ["smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]


@hookimpl
def astkit_register_presets(register):
    register("ast", AST, "all five AST techniques (Shen, Yang, Lam 2023)")
