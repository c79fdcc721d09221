"""influencekit: which training examples made my model predict this? Influence functions for PyTorch.

Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""

from . import deprecated_paths, hf, solvers, validation
from .core.errors import (
    ConvergenceWarning,
    CorruptFileWarning,
    CurvatureWarning,
    DistributedError,
    InfluenceKitError,
    InfluenceKitWarning,
    InputError,
    InputTypeError,
    NotFittedError,
    NumericalError,
    SolverDivergenceError,
    StationarityWarning,
    UnsupportedError,
)
from .core.projection import Projector
from .core.results import CONVENTION, GROUP_CONVENTION, GroupInfluence, InfluenceScores, RankedInfluence, TopK
from .core.spectrum import lanczos_extremes, power_iteration
from .core.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task
from .engine.attributors import TRAK, Ensemble, TracIn
from .engine.gradients import GradientSource
from .engine.hessian import HessianOperator
from .engine.scoring import Influence
from .engine.training import TrainReport, fit_lbfgs, fit_steps
from .index.influence_index import Display, InfluenceIndex
from .index.store import GradientStore
from .models.sklearn import from_sklearn, sklearn_labels
from .solvers import ArnoldiSolver, CGSolver, ExactSolver, LissaSolver, Solver, SolveReport
from .validation import GroupValidation, LDSResult, LOOResult, leave_one_out, linear_datamodeling_score, validate_groups

__version__ = "0.1.0"

deprecated_paths.install()  # the flat layout's module paths, as deprecated aliases

__all__ = [
    "Influence",
    "TracIn",
    "TRAK",
    "Ensemble",
    "GradientStore",
    "InfluenceIndex",
    "Display",
    "Projector",
    "from_sklearn",
    "sklearn_labels",
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "SmoothHingeTask",
    "InfluenceScores",
    "RankedInfluence",
    "TopK",
    "GroupInfluence",
    "CONVENTION",
    "GROUP_CONVENTION",
    "HessianOperator",
    "GradientSource",
    "Solver",
    "SolveReport",
    "ExactSolver",
    "CGSolver",
    "LissaSolver",
    "ArnoldiSolver",
    "solvers",
    "hf",
    "lanczos_extremes",
    "power_iteration",
    "fit_lbfgs",
    "fit_steps",
    "TrainReport",
    "validation",
    "leave_one_out",
    "LOOResult",
    "validate_groups",
    "GroupValidation",
    "linear_datamodeling_score",
    "LDSResult",
    "InfluenceKitError",
    "DistributedError",
    "InputError",
    "InputTypeError",
    "NotFittedError",
    "NumericalError",
    "SolverDivergenceError",
    "UnsupportedError",
    "InfluenceKitWarning",
    "ConvergenceWarning",
    "CorruptFileWarning",
    "CurvatureWarning",
    "StationarityWarning",
]
