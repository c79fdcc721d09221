"""Models with their own exact trainers, below the applications: the true-hinge linear SVM (``svm``) and the
RBF-kernel SVM on an explicit feature map (``kernel_svm``), and fitted scikit-learn models as an Influence
(``sklearn``).

May import: ``core``, ``data``, ``solvers`` and ``engine``. Imported by the public API (``ik.from_sklearn``), the
applications and the paper's package."""
