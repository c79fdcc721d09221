"""The foundations and the model mathematics every other layer builds on.

Errors, progress bars, argument checks, checked files and memory release (the foundations); flat parameter vectors
and autodiff products, the torch.distributed shard, spectra, projections, result types and the Task (data and model);
layer taps, low-rank factors, streaming top-k and the curvature operator protocol (structure).

May import: torch, numpy and this folder only (and ``influencekit.data``, beside it). Imported by everything above.
"""
