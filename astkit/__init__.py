"""astkit: dataset distillation by trajectory matching (MTT/AST) with plugins."""

from astkit._version import __version__
from astkit.config import (
    AugmentConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExpertConfig,
    ModelConfig,
    RunConfig,
)
from astkit.data import RawData
from astkit.engine import Engine
from astkit.errors import AstkitError, DivergenceError, FileFormatError, PluginError, UserError
from astkit.experts import ExpertBatch
from astkit.export import load_distilled, to_pixels
from astkit.hookspecs import hookimpl
from astkit.matching import MatchPoint
from astkit.progress import Progress
from astkit.results import DistilledSet, EvaluationResult, IterationMetrics, RunResult
from astkit.run_context import RunContext
from astkit.run_folder import RunFolder
from astkit.store import atomic_write
from astkit.trajectory import ModelSpec, Trajectory

#: Everything a plugin, an example or a script may use. Plugins and examples
#: import from ``astkit`` only, and only these names (tests/test_layers.py).
__all__ = [
    "AstkitError", "AugmentConfig", "DataConfig", "DistillConfig", "DistilledSet", "DivergenceError", "Engine",
    "EvalConfig", "EvaluationResult", "ExpertBatch", "ExpertConfig", "FileFormatError", "IterationMetrics",
    "MatchPoint", "ModelConfig", "ModelSpec", "PluginError", "Progress", "RawData", "RunConfig", "RunContext", "RunFolder",
    "RunResult", "Trajectory", "UserError", "__version__", "atomic_write", "hookimpl", "load_distilled", "to_pixels",
]
