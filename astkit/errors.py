"""Errors astkit raises for problems a user can fix.

A :class:`UserError` is printed by the CLI as one line (no traceback unless
``--debug``); its message names the problem and, where possible, the fix.
"""


class AstkitError(Exception):
    """Base class of every error astkit raises on purpose."""


class UserError(AstkitError):
    """Bad input: an unknown name, a missing file, an invalid config value."""


class PluginError(UserError):
    """A plugin could not be loaded, selected or combined with another."""


class FileFormatError(UserError):
    """A file is not an astkit file, is corrupt, or does not fit the run."""


class DivergenceError(AstkitError):
    """Distillation produced NaN or Inf more often than the policy allows."""
