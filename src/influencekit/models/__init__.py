"""Models with their own exact trainers, below the applications: the true-hinge linear SVM (``svm``) and the
RBF-kernel SVM on an explicit feature map (``kernel_svm``). They depend on the engine only."""
