"""Command-line front end: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="influencekit",
    help="Influence functions for PyTorch models: which training examples made my model predict this?",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """influencekit: influence of training points on a model's predictions (Koh & Liang 2017)."""


@app.command()
def demo(
    n_test: int = typer.Option(3, help="How many test digits to explain (the highest-loss ones)."),
    k: int = typer.Option(5, help="How many helpful and harmful training points to list per test digit."),
    solver: str = typer.Option("cg", help="Inverse-Hessian solver: exact, cg or lissa."),
    l2: float = typer.Option(1e-3, help="L2 strength λ inside each example's loss."),
    seed: int = typer.Option(0, help="Seed of the train/test split."),
) -> None:
    """Explain a few test digits of scikit-learn's bundled digits with multiclass logistic regression."""
    from .applications.explain import explain_digits

    report = explain_digits(n_test=n_test, k=k, solver=solver, l2=l2, seed=seed, progress=True)
    typer.echo(report)


def main() -> None:
    """Entry point of the ``influencekit`` command."""
    from .errors import InfluenceKitError

    try:
        app()
    except InfluenceKitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
