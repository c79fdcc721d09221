"""The paper's applications as library workflows on any model and data: explaining predictions (``explain``),
ranking training points to find mislabeled ones (``mislabel``), training-set attacks (``attack``), the features
behind an influence (``mismatch``) and ``influencekit inspect`` on a CSV file (``inspect``). The paper's
experiments that run them on its data sets are in :mod:`influencekit_paper`.

May import: everything of the library below them (``core`` … ``validation``, ``index``). Imported by the CLI and the
paper's package."""
