"""astkit: dataset distillation by trajectory matching (MTT/AST) with plugins."""

__version__ = "0.1.0"

from astkit.config import (  # noqa: E402
    AugmentConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExpertConfig,
    ModelConfig,
    RunConfig,
)
from astkit.engine import Engine  # noqa: E402
from astkit.errors import AstkitError, UserError  # noqa: E402
from astkit.experts import ExpertBatch  # noqa: E402
from astkit.hookspecs import hookimpl  # noqa: E402
from astkit.matching import MatchPoint  # noqa: E402
from astkit.progress import Progress  # noqa: E402
from astkit.results import DistilledSet, EvaluationResult, IterationMetrics, RunResult  # noqa: E402
from astkit.run_folder import RunFolder  # noqa: E402
from astkit.trajectory import ModelSpec, Trajectory  # noqa: E402

__all__ = [
    "AstkitError", "AugmentConfig", "DataConfig", "DistillConfig", "DistilledSet", "Engine", "EvalConfig",
    "EvaluationResult", "ExpertBatch", "ExpertConfig", "IterationMetrics", "MatchPoint", "ModelConfig",
    "ModelSpec", "Progress", "RunConfig", "RunFolder", "RunResult", "Trajectory", "UserError", "hookimpl",
]
