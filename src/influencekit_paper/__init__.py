"""The experiments of Koh & Liang (2017), apart from the library: the paper's data sets, its models and runners.

They use the engine and :mod:`influencekit.applications`; nothing in the library imports them.

    data/           readers of the paper's data sets, from the files as distributed (nothing is downloaded):
                    mnist.py (MNIST IDX files), enron.py (Enron1 spam tarball), readmission.py (UCI diabetes zip)
    demo.py         `influencekit demo`: influence vs leave-one-out retraining on scikit-learn's digits
    retraining.py   `influencekit paper fig2/fig3`: Figures 2 and 3 on MNIST
    image_problem.py  two digit classes on a frozen CNN feature extractor (the model of §5.1 and §5.2)
    compare.py      `influencekit paper fig4`: Figure 4, an RBF SVM vs a model on learned features
    attack.py       `influencekit attack`: the training-set attack of §5.2; perturbations.py draws it
    mismatch.py     `influencekit paper readmission`: the domain mismatch of §5.3
    spam.py         `influencekit paper spam`: mislabel detection on Enron1 spam, Figure 6 (§5.4)
    minilm.py       all-MiniLM-L6-v2 (real weights) fine-tuned on Enron1: the transformer of benchmarks/transformers.py
                    and of mislabel detection by EK-FAC self-influence (benchmarks/transformer_mislabel.py)
    enron_lm.py     a small GPT-2 trained here on Enron1 text: the causal LM of benchmarks/transformers.py --case causal
"""
