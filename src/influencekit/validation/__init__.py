"""Validation: influence predictions against actual retraining.

May import: everything below it (``core``, ``data``, ``solvers``, ``engine``). Imported by the applications, the
paper's package and the CLI.

- :func:`leave_one_out`: −I_up,loss/n against leave-one-out retraining (Koh & Liang 2017, Figure 2),
  resumable through an on-disk cache, in parallel worker processes if asked; :class:`StepRetrain` retrains
  a non-convex model with a fixed budget of optimiser steps against a no-removal control run; returns a
  :class:`LOOResult` with Pearson/Spearman and ``.plot()``.
- :func:`validate_groups`: group-removal retraining against each order of the group-influence prediction
  (Koh et al. 2019; Basu et al. 2020); a :class:`GroupValidation` with the metrics per order and ``.plot()``.
- :func:`linear_datamodeling_score`: the LDS of Park et al. (2023, TRAK) over random training subsets.
- :func:`subset_outputs` and :func:`datamodel_score`: the LDS of a deep network as the field measures it, against
  models trained from scratch with the user's own recipe on random subsets (kept in a resumable folder);
  :func:`choose_held_out`: a setting (e.g. the damping) chosen on some of those subsets, scored on the others.
- :func:`pearson`, :func:`spearman`: checked correlation coefficients.
- :func:`plot_loo`: the Figure-2 scatter (matplotlib, Agg canvas).

Inside the package the imports go one way: :mod:`.stats` (checked vectors, NaN-safe correlations) and
:mod:`.retraining` (the retrainer, its checks, the test selection, :class:`StepRetrain`) at the bottom;
:mod:`.metrics` above them; :mod:`.plot`, :mod:`.loo`, :mod:`.groups` and :mod:`.datamodels` above that.
"""

from .datamodels import DatamodelScore, HeldOutChoice, SubsetOutputs, choose_held_out, datamodel_score, subset_outputs
from .groups import GroupValidation, validate_groups
from .loo import LOOResult, leave_one_out
from .metrics import LDSResult, linear_datamodeling_score, pearson, spearman
from .plot import plot_groups, plot_loo
from .retraining import StepRetrain

__all__ = [
    "leave_one_out",
    "LOOResult",
    "StepRetrain",
    "linear_datamodeling_score",
    "LDSResult",
    "pearson",
    "spearman",
    "plot_loo",
    "plot_groups",
    "validate_groups",
    "GroupValidation",
    "subset_outputs",
    "SubsetOutputs",
    "datamodel_score",
    "DatamodelScore",
    "choose_held_out",
    "HeldOutChoice",
]
