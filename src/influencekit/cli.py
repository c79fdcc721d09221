"""Command-line front end: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="influencekit",
    help="Influence functions for PyTorch models: which training examples made my model predict this?",
    no_args_is_help=True,
    add_completion=False,
)


paper = typer.Typer(
    help="Reproduce the experiments of Koh & Liang (2017) on real data from a folder you give.",
    no_args_is_help=True,
)
app.add_typer(paper, name="paper")

index_app = typer.Typer(help="Build an influence index for the explorer (`influencekit serve`).", no_args_is_help=True)
app.add_typer(index_app, name="index")


@app.callback()
def _root(ctx: typer.Context) -> None:
    """influencekit: influence of training points on a model's predictions (Koh & Liang 2017)."""
    _advise_with_flags(ctx)


@paper.callback()
def _paper(ctx: typer.Context) -> None:
    """Reproduce the experiments of Koh & Liang (2017) on real data from a folder you give."""
    _advise_with_flags(ctx)


@index_app.callback()
def _index(ctx: typer.Context) -> None:
    """Build an influence index for the explorer (`influencekit serve`)."""
    _advise_with_flags(ctx)


@index_app.command("build")
def index_build(
    demo: str = typer.Option(
        "digits", help="The ready-made index: digits (bundled), mnist (CNN, 9,000 images) or enron (spam e-mails)."
    ),
    data: Path | None = typer.Option(
        None, help="mnist: the folder of the MNIST IDX files; enron: enron1.tar.gz or its folder."
    ),
    out: Path = typer.Option(
        Path("influencekit-index"), help="The index folder (created; a finished one is reopened)."
    ),
    solver: str | None = typer.Option(
        None, help="Inverse-Hessian solver (default: exact for digits and enron, ekfac for mnist)."
    ),
) -> None:
    """Train the demo model and store everything influence queries need: fitted solver, training rows,
    self-influence."""
    import time

    from influencekit_paper.index_demo import build_demo_index

    start = time.perf_counter()
    index = build_demo_index(demo, out, data=data, solver=solver, progress=True)
    solver = index.config["solver"]["solver"] if isinstance(index.config["solver"], dict) else index.config["solver"]
    typer.echo(
        f"index of {index.n_train} training / {index.config['n_test']} test examples ({solver}, rows in the "
        f"{index.config['space']} space, width {index.config['width']}) in {out} ({time.perf_counter() - start:.1f} "
        "s); "
        f"serve it with: influencekit serve --index {out}"
    )


@app.command("serve")
def serve_command(
    index: Path = typer.Option(..., "--index", help="An index folder built by `influencekit index build`."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (localhost by default; 0.0.0.0 exposes it to the network)."
    ),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Serve the influence explorer: a page and a JSON API (see /docs) over an index."""
    from influencekit_paper.index_demo import open_served_index

    from .index.serve import serve

    opened = open_served_index(index)
    typer.echo(f"influencekit explorer on http://{host}:{port}/ (API schema at /docs); Ctrl-C stops it")
    serve(opened, host=host, port=port)


def _advise_with_flags(ctx: typer.Context) -> None:
    """Advice in errors and warnings names the flags of the command about to run (``setting_hint``)."""
    from .core.errors import command_line_settings

    group = ctx.command
    command = getattr(group, "commands", {}).get(ctx.invoked_subcommand or "")
    if command is None or hasattr(command, "commands"):  # a group: its own callback sets the flags
        return
    flags = {opt for param in command.params for opt in getattr(param, "opts", ()) if opt.startswith("--")}
    settings = command_line_settings(flags)
    settings.__enter__()
    ctx.call_on_close(lambda: settings.__exit__(None, None, None))


def _solver_options(items: list[str]) -> dict[str, object]:
    """``--solver-option NAME=VALUE`` items as solver options: whole numbers, decimals, true/false/none, else text."""
    from .core.errors import InputError

    options: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--solver-option must be NAME=VALUE (e.g. depth=2000). Got {item!r}.")
        low = text.strip().lower()
        value: object
        if low in ("true", "false"):
            value = low == "true"
        elif low == "none":
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text.strip()
        options[name.strip()] = value
    return options


SOLVER_OPTION_HELP = "A setting of the solver as NAME=VALUE, repeatable (e.g. --solver-option depth=2000 for lissa)."


@app.command()
def demo(
    out: Path = typer.Option(
        Path("influencekit-demo"), help="Output folder for the report, figures and cached retrainings."
    ),
    n_test: int = typer.Option(3, help="How many test digits to check (the highest-loss ones)."),
    top_k: int = typer.Option(30, help="Training points with the largest |influence| removed per test digit."),
    n_random: int = typer.Option(20, help="Random training points removed per test digit."),
    solvers: str = typer.Option("exact,cg,lissa", help="Comma-separated solvers to compare."),
    seed: int = typer.Option(0, help="Seed of the split and of the random training points."),
) -> None:
    """Influence vs actual leave-one-out retraining on scikit-learn's digits, with a report and figures."""
    from influencekit_paper.demo import run_demo

    result = run_demo(
        out,
        n_test=n_test,
        top_k=top_k,
        n_random=n_random,
        seed=seed,
        solvers=tuple(s.strip() for s in solvers.split(",") if s.strip()),
        progress=True,
    )
    typer.echo(result.text)


@app.command()
def explain(
    n_test: int = typer.Option(3, help="How many test digits to explain (the highest-loss ones)."),
    k: int = typer.Option(5, help="How many helpful and harmful training points to list per test digit."),
    solver: str = typer.Option("cg", help="Inverse-Hessian solver: exact, cg or lissa."),
    solver_option: list[str] = typer.Option([], "--solver-option", help=SOLVER_OPTION_HELP),
    l2: float = typer.Option(1e-3, help="L2 strength λ inside each example's loss."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
) -> None:
    """Print the most helpful and harmful training digits for the highest-loss test digits."""
    from .applications.explain import explain_digits

    typer.echo(
        explain_digits(
            n_test=n_test,
            k=k,
            solver=solver,
            solver_options=_solver_options(solver_option),
            l2=l2,
            seed=seed,
            progress=True,
        )
    )


@paper.command("spam")
def spam(
    enron: Path = typer.Option(..., help="enron1.tar.gz (Enron-Spam, as distributed) or the folder holding it."),
    out: Path = typer.Option(Path("influencekit-spam"), help="Output folder for mislabel.png and report.md."),
    min_df: int = typer.Option(50, help="A word is a feature when it occurs in at least this many e-mails."),
    l2: float = typer.Option(1e-4, help="L2 strength λ inside each example's loss."),
    flip: float = typer.Option(0.1, help="Fraction of training labels flipped."),
    fractions: str = typer.Option(
        "0.05,0.1,0.15,0.2,0.25,0.3", help="Comma-separated fractions of the training set checked."
    ),
    seeds: int = typer.Option(3, help="Number of flip seeds averaged (0, 1, ...)."),
    split_seed: int = typer.Option(0, help="Seed of the 80/20 train/test split."),
) -> None:
    """Mislabel detection on Enron1 spam: self-influence vs training loss vs random (paper Fig. 6)."""
    from influencekit_paper.spam import run_spam

    try:
        checked = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise typer.BadParameter(
            f"must be comma-separated numbers such as 0.05,0.1. Got {fractions!r}.", param_hint="--fractions"
        ) from None
    result = run_spam(
        enron,
        out,
        min_df=min_df,
        l2=l2,
        flip_fraction=flip,
        fractions=checked,
        seeds=tuple(range(seeds)),
        split_seed=split_seed,
        progress=True,
    )
    typer.echo(result.text)


@paper.command("fig2")
def fig2(
    mnist: Path = typer.Option(
        ..., help="Folder with MNIST IDX files (t10k-images-idx3-ubyte.gz, ...; train-* optional)."
    ),
    out: Path = typer.Option(
        Path("influencekit-fig2"), help="Output folder for the report, figures and cached retrainings."
    ),
    part: str = typer.Option("both", help="Which half of Figure 2: logistic, cnn or both."),
    n_train: int = typer.Option(8000, help="Training images for the logistic regression."),
    top_k: int = typer.Option(500, help="Training points with the largest |influence| removed (logistic regression)."),
    solvers: str = typer.Option(
        "exact,cg,lissa",
        help="Comma-separated solvers for the logistic regression; the first chooses the points removed.",
    ),
    cnn_n_train: int = typer.Option(1000, help="Training images for the CNN (float64 convolutions on CPU are slow)."),
    cnn_top_k: int = typer.Option(100, help="Training points removed for the CNN."),
    retrain_steps: int = typer.Option(100, help="Adam steps of each CNN retraining (and of the control run)."),
    workers: int = typer.Option(1, help="Worker processes for the CNN retrainings."),
    test_index: int = typer.Option(-1, help="Test image to explain; -1 picks the highest-loss one."),
    seed: int = typer.Option(0, help="Seed of the train/test split and the CNN's initialisation."),
) -> None:
    """Figure 2: influence vs leave-one-out retraining on MNIST (logistic regression; tanh CNN with damping)."""
    from influencekit_paper.retraining import run_fig2_cnn, run_fig2_logistic

    from .core.errors import InputError

    if part not in ("logistic", "cnn", "both"):
        raise InputError(f"`--part` must be logistic, cnn or both. Got {part!r}.")
    chosen = None if test_index < 0 else test_index
    if part in ("logistic", "both"):
        result = run_fig2_logistic(
            mnist,
            out / "logistic",
            n_train=n_train,
            top_k=top_k,
            test_index=chosen,
            seed=seed,
            progress=True,
            solvers=tuple(s.strip() for s in solvers.split(",") if s.strip()),
        )
        typer.echo(result.text)
    if part in ("cnn", "both"):
        result = run_fig2_cnn(
            mnist,
            out / "cnn",
            n_train=cnn_n_train,
            top_k=cnn_top_k,
            retrain_steps=retrain_steps,
            workers=workers,
            test_index=chosen,
            seed=seed,
            progress=True,
        )
        typer.echo(result.text)


@paper.command("fig3")
def fig3(
    mnist: Path = typer.Option(
        ..., help="Folder with MNIST IDX files (t10k-images-idx3-ubyte.gz, ...; train-* optional)."
    ),
    out: Path = typer.Option(
        Path("influencekit-fig3"), help="Output folder for the report, figures and cached retrainings."
    ),
    l2: float = typer.Option(0.1, help="L2 strength λ of the SVM (weights and bias)."),
    temperatures: str = typer.Option("0,0.001,0.1", help="Comma-separated smooth-hinge temperatures t."),
    top_k: int = typer.Option(60, help="Training points with the largest |influence| (at t = 0.001) removed."),
    n_random: int = typer.Option(40, help="Random training points removed."),
    test_index: int = typer.Option(-1, help="Test image to explain; -1 picks the highest-loss one."),
    seed: int = typer.Option(0, help="Seed of the train/test split and the random training points."),
) -> None:
    """Figure 3: smooth-hinge influence of a true-hinge linear SVM (MNIST 1 vs 7) vs exact retraining."""
    from influencekit_paper.retraining import run_fig3

    from .core.errors import InputError

    try:
        temps = tuple(float(t) for t in temperatures.split(",") if t.strip())
    except ValueError:
        raise InputError(
            f"`--temperatures` must be comma-separated numbers, e.g. 0,0.001,0.1. Got {temperatures!r}."
        ) from None
    result = run_fig3(
        mnist,
        out,
        l2=l2,
        temperatures=temps,
        top_k=top_k,
        n_random=n_random,
        test_index=None if test_index < 0 else test_index,
        seed=seed,
        progress=True,
    )
    typer.echo(result.text)


@paper.command("readmission")
def readmission(
    csv: Path = typer.Option(
        ...,
        help="dataset_diabetes.zip (UCI Diabetes 130-US hospitals, as distributed), diabetic_data.csv, or a folder "
        "holding either.",
    ),
    out: Path = typer.Option(Path("influencekit-readmission"), help="Output folder for report.md and influence.png."),
    n_train: int = typer.Option(20_000, help="Balanced training set size before the removal (half readmitted)."),
    keep_healthy_children: int = typer.Option(1, help="Healthy children [0-10) left in the training set."),
    l2: float = typer.Option(1e-4, help="L2 strength λ inside each example's loss."),
    solver: str = typer.Option("exact", help="Inverse-Hessian solver: exact or cg."),
    k: int = typer.Option(10, help="Most influential training points explained feature by feature."),
    label: str = typer.Option("<30", help="Readmitted means: <30 (within 30 days, the paper's) or any."),
    test_row: int = typer.Option(
        -1, help="0-based CSV row of the test encounter to explain; -1 picks the highest-loss healthy child."
    ),
    seed: int = typer.Option(0, help="Seed of the training set draw and of the healthy children kept."),
) -> None:
    """Domain mismatch (paper section 5.3): the few children left in the training set drive a child's wrong
    prediction."""
    from influencekit_paper.mismatch import run_readmission

    result = run_readmission(
        csv,
        out,
        n_train=n_train,
        keep_healthy_children=keep_healthy_children,
        l2=l2,
        solver=solver,
        k=k,
        label=label,
        test_row=None if test_row < 0 else test_row,
        seed=seed,
        progress=True,
    )
    typer.echo(result.text)


@paper.command("groups")
def groups(
    problem: str = typer.Argument(
        ...,
        help="readmission (the §5.3 mismatch: age groups, admission sources) or spam (Enron1: clusters, address "
        "tokens).",
    ),
    data: Path = typer.Option(
        ..., help="readmission: dataset_diabetes.zip (or diabetic_data.csv); spam: enron1.tar.gz or its folder."
    ),
    out: Path = typer.Option(Path("influencekit-groups"), help="Output folder for report.md and groups.png."),
    seed: int = typer.Option(
        0, help="Seed of the training-set draw (readmission) or of the split and clusters (spam)."
    ),
) -> None:
    """Group effects: predicted (orders 1, 2, Newton) against retrained effect of removing each group of training
    points."""
    from influencekit_paper.group_effects import run_group_effects

    typer.echo(run_group_effects(problem, data, out, seed=seed, progress=True).text)


@paper.command("fig4")
def fig4(
    mnist: Path = typer.Option(None, help="Folder with MNIST IDX files (default: scikit-learn's bundled 8x8 digits)."),
    out: Path = typer.Option(Path("influencekit-fig4"), help="Output folder for report.md and the figures."),
    classes: str = typer.Option("3,8", help="The two digits of the binary task."),
    svm_l2: float = typer.Option(0.1, help="L2 strength λ of the RBF SVM (weights and bias)."),
    gamma: float = typer.Option(0.0, help="RBF width γ; 0 uses 1 / (pixels · pixel variance)."),
    temperature: float = typer.Option(0.001, help="Smooth-hinge temperature t of the SVM's influence."),
    feature_map: str = typer.Option(
        "auto", help="Kernel feature map: exact, fourier or auto (exact up to 3,000 images)."
    ),
    n_plot: int = typer.Option(3, help="Test images drawn (scatter plots and the helpful-image gallery)."),
    seed: int = typer.Option(0, help="Seed of the split and of the feature extractor's training."),
) -> None:
    """Figure 4 (paper section 5.1): influence vs pixel distance for an RBF SVM and a model on learned features."""
    from influencekit_paper.compare import run_fig4

    try:
        pair = tuple(int(c) for c in classes.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"must be two comma-separated digits such as 3,8. Got {classes!r}.", param_hint="--classes"
        ) from None
    result = run_fig4(
        out,
        mnist=mnist,
        classes=pair,
        svm_l2=svm_l2,
        gamma=gamma or None,
        temperature=temperature,
        feature_map=feature_map,
        n_plot=n_plot,
        seed=seed,
    )
    typer.echo(result.text)


@app.command()
def attack(
    mnist: Path = typer.Option(None, help="Folder with MNIST IDX files (default: scikit-learn's bundled 8x8 digits)."),
    out: Path = typer.Option(Path("influencekit-attack"), help="Output folder for the report and figures."),
    classes: str = typer.Option("3,8", help="The two digits of the binary task."),
    n_perturb: str = typer.Option("1,2,10", help="Comma-separated numbers of training images to perturb per attack."),
    max_targets: int = typer.Option(20, help="Correctly classified test images to attack (0: all of them)."),
    eps: float = typer.Option(0.1, help="L-inf radius of the perturbation, pixels in [0, 1]."),
    step: float = typer.Option(0.01, help="Size of each signed step."),
    max_iter: int = typer.Option(50, help="Most attack iterations (each retrains the top layer)."),
    multi_size: int = typer.Option(
        5, help="Test images of one class attacked together in the multi-target variant (0: skip)."
    ),
    multi_perturb: int = typer.Option(1, help="Training images perturbed in the multi-target variant."),
    seed: int = typer.Option(0, help="Seed of the split and of the feature extractor's training."),
) -> None:
    """Training-set attack through I_pert (paper section 5.2): flip test predictions by perturbing training images."""
    from influencekit_paper.attack import run_attack_experiment

    try:
        pair, sizes = (
            tuple(int(c) for c in classes.split(",")),
            tuple(int(k) for k in n_perturb.split(",") if k.strip()),
        )
    except ValueError:
        raise typer.BadParameter(
            f"--classes and --n-perturb take comma-separated integers. Got {classes!r} and {n_perturb!r}."
        ) from None
    result = run_attack_experiment(
        out,
        mnist=mnist,
        classes=pair,
        n_perturb=sizes,
        max_targets=max_targets or None,
        eps=eps,
        step=step,
        max_iter=max_iter,
        multi_size=multi_size,
        multi_perturb=multi_perturb,
        seed=seed,
        progress=True,
    )
    typer.echo(result.text)


@app.command()
def inspect(
    data: Path = typer.Argument(..., help="Training CSV: a header row, then one row per example."),
    label: str = typer.Option(..., help="Name of the label column."),
    test: Path | None = typer.Option(
        None, help="Test CSV with the same columns; without it a share of DATA is held out."
    ),
    model: str = typer.Option(
        "logreg", help="logreg (logistic regression, exact influence) or mlp (one tanh hidden layer)."
    ),
    out: Path = typer.Option(
        Path("influencekit-inspect"), help="Output folder for report.html, mislabeled.csv, influence.csv."
    ),
    l2: float = typer.Option(1e-3, help="L2 strength λ inside each example's loss."),
    damping: float | None = typer.Option(None, help="Damping δ of the Hessian (default 0 for logreg, 0.01 for mlp)."),
    solver: str = typer.Option("exact", help="Inverse-Hessian solver: exact, cg or lissa."),
    solver_option: list[str] = typer.Option([], "--solver-option", help=SOLVER_OPTION_HELP),
    hidden: int = typer.Option(16, help="mlp: hidden units."),
    steps: int = typer.Option(1000, help="mlp: full-batch Adam steps."),
    lr: float = typer.Option(0.01, help="mlp: Adam learning rate."),
    k: int = typer.Option(5, help="Helpful and harmful training rows listed per test row."),
    n_suspicious: int = typer.Option(20, help="Training rows listed as most likely mislabeled."),
    max_test_rows: int = typer.Option(
        20, help="Test rows explained at most (the highest-loss ones when there are more)."
    ),
    test_fraction: float = typer.Option(0.2, help="Share of DATA held out for testing when --test is not given."),
    categorical: str = typer.Option(
        "", help="Comma-separated columns to treat as categories even if their values are numbers."
    ),
    numeric: str = typer.Option(
        "", help="Comma-separated columns to treat as numbers (every other value is an error)."
    ),
    ignore: str = typer.Option("", help="Comma-separated columns to leave out (identifiers, free text)."),
    max_categories: int = typer.Option(
        30, help="One-hot columns per categorical column at most (rarer values share '(other)')."
    ),
    delimiter: str = typer.Option(",", help="Field separator of the CSV files."),
    chunk_size: int = typer.Option(10_000, help="Rows converted at a time while reading."),
    seed: int = typer.Option(0, help="Seed of the held-out split and of the mlp's initialisation."),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        help="Column whose values group the training rows: rank the groups by the predicted effect of removing each.",
    ),
) -> None:
    """Influence on a CSV table: the training rows most likely mislabeled and, per test row, the most helpful and
    harmful ones."""
    from .applications.inspect import run_inspect

    def names(text: str) -> tuple[str, ...]:
        return tuple(c.strip() for c in text.split(",") if c.strip())

    result = run_inspect(
        data,
        label,
        test=test,
        out_dir=out,
        model=model,
        l2=l2,
        damping=damping,
        solver=solver,
        solver_options=_solver_options(solver_option),
        hidden=hidden,
        steps=steps,
        lr=lr,
        k=k,
        n_suspicious=n_suspicious,
        max_test_rows=max_test_rows,
        test_fraction=test_fraction,
        categorical=names(categorical),
        numeric=names(numeric),
        ignore=names(ignore),
        max_categories=max_categories,
        delimiter=delimiter,
        chunk_size=chunk_size,
        seed=seed,
        group_by=group_by,
        progress=True,
    )
    typer.echo(result.text)


# Under torchrun every rank runs the command line. These commands then run on every rank, their influence
# computations sharded across the process group (rank 0 alone prints and writes files); any other command runs
# on rank 0 alone, unsharded, and the other ranks exit at once.
SHARDED_COMMANDS = frozenset({"demo", "explain"})


def main() -> None:
    """Entry point of the ``influencekit`` command (also under ``torchrun ... -m influencekit.cli``)."""
    import contextlib
    import os

    from .core.distributed import init_from_environment, is_main_process
    from .core.errors import InfluenceKitError

    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    rank = int(os.environ.get("RANK") or 0)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and command not in SHARDED_COMMANDS and rank != 0:
        return
    owned = command in SHARDED_COMMANDS and init_from_environment()
    try:
        with contextlib.ExitStack() as stack:
            if not is_main_process():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            app()
    except InfluenceKitError as exc:
        typer.echo(f"error: {f'rank {rank}: ' if owned else ''}{exc}", err=True)
        sys.exit(2)
    finally:
        if owned:
            import torch.distributed as dist

            with contextlib.suppress(Exception):  # every rank leaves together: a rank that tears its process group
                dist.barrier()  # down while another still writes aborted in gloo's threads (1 run in ~10)
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
