"""Mislabel detection on a real transformer (the paper's §5.4 with all-MiniLM-L6-v2 instead of logistic regression).

Flip 10% of 2,000 Enron1 training labels (seeded), fine-tune MiniLM + a mean-pooled head on them (AdamW, 2 epochs;
``influencekit_paper.minilm``, cached in ``--cache``), rank the training e-mails by EK-FAC self-influence
over block 5's Linear layers and the head (1,773,698 parameters, the frozen prefix cached), by training loss and
at random, and print the fraction of the flipped labels among the first 5/10/20/30% of each ranking.

    .venv/bin/python benchmarks/transformer_mislabel.py      # ~25 minutes on 2 cores the first time (fine-tuning)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

# benchmarks/transformers.py would shadow the Hugging Face package: drop this folder from sys.path first
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
ENRON = ROOT.parent / "shared" / "data" / "enron"


def main() -> None:
    from influencekit_paper.minilm import MODULES, Recipe, detect_flipped, fine_tuned_minilm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flip", type=float, default=0.1)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "benchmarks")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not ENRON.exists():
        raise SystemExit(f"this benchmark needs the Enron1 tarball in {ENRON} (../shared/data/enron)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ft = fine_tuned_minilm(ENRON, args.cache, Recipe(flip=args.flip), progress=True)
    print(
        f"fine-tuned (or loaded) in {time.perf_counter() - t0:.0f} s; test accuracy {ft.test_accuracy:.3f}; "
        f"{len(ft.flipped)} flipped labels",
        flush=True,
    )
    result = detect_flipped(ft, MODULES["pooled"]["block5"], damping=args.damping, progress=True)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=1))
    print("fraction of flipped labels found, by the share of the training set checked:")
    print("checked  " + "  ".join(f"{f:>6.0%}" for f in result["fractions"]))
    for by, found in result["found"].items():
        print(f"{by:15s}" + "  ".join(f"{x:6.3f}" for x in found))


if __name__ == "__main__":
    main()
