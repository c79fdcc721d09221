"""Readers of the paper's data sets, straight from the files as distributed: MNIST IDX files (``mnist``), the
Enron1 spam tarball (``enron``) and the UCI diabetes readmission zip (``readmission``)."""
