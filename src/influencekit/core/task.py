"""Tasks: what the loss of one example is, which parameters count, and what is measured on a test point.

The training objective is the mean per-example loss with the L2 term inside it (Koh & Liang 2017, and
docs/conventions.md)::

    R(θ) = (1/n) Σ_i L(z_i, θ),   L(z, θ) = ℓ(z, θ) + (λ/2)‖θ‖²

where θ are the *selected* parameters (all trainable ones by default) and ℓ is :meth:`Task.loss`.
The test side uses :meth:`Task.measurement`, which defaults to ℓ (no L2 term).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.examples import Batch, DataSource
from .checks import check_choice, check_number
from .errors import InfluenceKitError, InputError, InputTypeError

__all__ = ["Task", "ClassificationTask", "RegressionTask", "SmoothHingeTask", "smooth_hinge", "Params"]

Params = dict[str, torch.Tensor]
ParamSelector = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]


def _unwrap(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"`model` must be a torch.nn.Module. Got {type(model).__name__}.")
    # DistributedDataParallel and DataParallel keep the real model in .module.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _matches(name: str, wanted: str) -> bool:
    """``name`` is the parameter ``wanted``, lies in the module ``wanted``, or matches the glob pattern ``wanted``
    (``*`` also crosses dots: ``"encoder.layer.5.*"``, ``"*.attention.*.query"``), as a parameter or a module."""
    if name == wanted or name.startswith(wanted + "."):
        return True
    return any(c in wanted for c in "*?[") and (
        fnmatch.fnmatchcase(name, wanted) or fnmatch.fnmatchcase(name, wanted + ".*")
    )


def _select(model: nn.Module, selector: ParamSelector) -> tuple[str, ...]:
    named = list(model.named_parameters())
    if selector is None:
        names = tuple(n for n, p in named if p.requires_grad)
        if not names:
            raise InputError(
                "`model` must have at least one trainable parameter (requires_grad=True). Got none; "
                "unfreeze the parameters influence should be computed for, or pass `params=` with their names."
            )
        return names
    if callable(selector) and not isinstance(selector, str):
        names = tuple(n for n, p in named if selector(n, p))
    else:
        wanted = [selector] if isinstance(selector, str) else list(selector)
        if not all(isinstance(w, str) for w in wanted):
            raise InputTypeError("`params` must be None, parameter/module names, or a callable(name, param) -> bool.")
        all_names = [n for n, _ in named]
        # a tied weight has one name in named_parameters() and another under each further module that holds it
        # (GPT-2's lm_head.weight is transformer.wte.weight): any of its names selects it
        canonical = {id(p): n for n, p in named}
        aliases = [(alias, canonical[id(p)]) for alias, p in model.named_parameters(remove_duplicate=False)]
        chosen: list[str] = []
        for w in wanted:
            hits = list(dict.fromkeys(name for alias, name in aliases if _matches(alias, w)))
            if not hits:
                raise InputError(
                    f"`params` names {w!r}, which is neither a parameter nor a module of the model. "
                    f"Parameters are: {', '.join(all_names[:20])}{' ...' if len(all_names) > 20 else ''}."
                )
            chosen.extend(h for h in hits if h not in chosen)
        names = tuple(n for n in all_names if n in chosen)
    if not names:
        raise InputError(
            "`params` selects no parameter of the model. Got an empty selection; name at least one parameter or module."
        )
    return names


def _describe_inputs(batch: Batch) -> str:
    leaves = (
        batch.items() if isinstance(batch, dict) else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
    )
    return ", ".join(
        f"[{k!r}] shape {tuple(v.shape[1:])} {str(v.dtype).removeprefix('torch.')}"
        for k, v in leaves
        if isinstance(v, torch.Tensor)
    )


def forward_error(model: nn.Module, batch: Batch, name: str, exc: Exception) -> InputError:
    """An InputError for a model that cannot take ``batch``: the examples' shapes and dtypes (per example), what the
    model's first layer expects, and the fix for integer inputs to a floating model."""
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))), None
    )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    expects = ""
    if isinstance(first, nn.Linear):
        expects = f" The model's first layer {first!r} expects {first.in_features} features per example, in {dtype}."
    elif isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        expects = (
            f" The model's first layer {type(first).__name__} expects {first.in_channels} input channels, in {dtype}."
        )
    elif isinstance(first, nn.Embedding):
        expects = f" The model's first layer {first!r} expects integer token ids below {first.num_embeddings}."
    tensors = [
        v
        for v in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch])
        if isinstance(v, torch.Tensor)
    ]
    fix = ""
    if tensors and not tensors[0].is_floating_point() and not isinstance(first, nn.Embedding) and dtype is not None:
        fix = f" The inputs are integers: convert them, e.g. X.to({dtype})."
    return InputError(
        f"the model cannot take the examples of {name if name.startswith('the ') else f'`{name}`'}: each has "
        f"{_describe_inputs(batch)}.{expects}{fix} (torch: {type(exc).__name__}: {exc})"
    )


def _refuse_labels(task: str, name: str, allowed: str, target: torch.Tensor, bad: torch.Tensor, offset: int) -> None:
    """Raise InputError naming the first label at the positions ``bad`` (if any) and how many more there are."""
    if len(bad):
        raise InputError(
            f"{task} labels in `{name}` must be {allowed}. Got {target[bad[0]].item()!r} at example "
            f"{offset + int(bad[0])}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + "."
        )


class Task:
    """A per-example loss over a model, the L2 strength inside it, and the parameters influence is about.

    Subclass it and define :meth:`loss` (and, optionally, :meth:`measurement`)::

        class MyTask(ik.Task):
            def loss(self, params, batch):
                x, y = batch
                return (self.forward(params, x).squeeze(-1) - y) ** 2   # shape (B,)

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` wrapper is unwrapped). It should be in eval
            mode: dropout or batch statistics make the loss random or batch-dependent.
        l2: λ of the L2 term (λ/2)‖θ‖² inside each example's training loss, over the selected parameters.
            Use the weight decay the model was trained with, converted to this convention.
        params: which parameters count: ``None`` (all with ``requires_grad``), names of parameters or of
            modules (``"fc"`` selects ``fc.weight`` and ``fc.bias``), glob patterns over those names (``*`` crosses
            dots: ``"bert.encoder.layer.5.*"``, ``"*.attention.*.query"``), or ``callable(name, param) -> bool``.
            The others stay fixed at their values (e.g. a frozen feature extractor).
    """

    def __init__(self, model: nn.Module, *, l2: float = 0.0, params: ParamSelector = None) -> None:
        self.model = _unwrap(model)
        self.l2 = check_number("l2", l2, low=0.0)
        self.param_names = _select(self.model, params)
        self.excluded_params: tuple[str, ...] = ()  # selected, then left out by the solver (restricted())

    def restricted(self, names: Sequence[str]) -> Task:
        """A copy of this task whose influence is over ``names`` only, a subset of its selected parameters; the
        others are listed as ``params_excluded`` in :meth:`describe` (K-FAC/EK-FAC leave out the parameters of layers
        they do not factor). The model and every other setting are shared."""
        unknown = [n for n in names if n not in self.param_names]
        if unknown or not names:
            raise InputError(
                f"restricted() takes a non-empty subset of the selected parameters. Got {list(names)[:5]}."
            )
        narrowed = copy.copy(self)
        narrowed.param_names = tuple(n for n in self.param_names if n in set(names))
        narrowed.excluded_params = self.excluded_params + tuple(n for n in self.param_names if n not in set(names))
        return narrowed

    # -- what subclasses define -------------------------------------------------------------------
    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        """Per-example loss ℓ(z, θ) of a batch, shape ``(B,)``, without the L2 term."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(params, batch) returning shape (B,).")

    def measurement(self, params: Params, batch: Batch) -> torch.Tensor:
        """What is measured on a test point, shape ``(B,)``; the test loss ℓ by default."""
        return self.loss(params, batch)

    # -- what the engine uses ---------------------------------------------------------------------
    def params(self) -> Params:
        """The selected parameters at their current values θ̂, detached, in model order."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def forward(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        """Call the model with ``params`` in place of the selected parameters; the rest enter detached, so autograd
        records no graph through the frozen part of the model (no memory for its activations)."""
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in params and p.requires_grad}
        return functional_call(self.model, {**frozen, **params}, args, kwargs, strict=False, tie_weights=True)

    def objective(self, params: Params, batch: Batch) -> torch.Tensor:
        """Per-example training loss L(z, θ) = ℓ(z, θ) + (λ/2)‖θ‖², shape ``(B,)``."""
        loss = self.loss(params, batch)
        if self.l2 == 0.0:
            return loss
        penalty = sum((p * p).sum() for p in params.values())
        return loss + 0.5 * self.l2 * penalty

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        """Refuse data this task cannot score (e.g. labels out of range); raise :class:`InputError`.

        Called on every batch before any gradient, outside ``vmap``, so it may inspect values. ``offset``
        is the position of the batch's first example in the data set named ``name``. Does nothing by default.
        """

    def check_examples(self, data: DataSource, name: str) -> None:
        """Refuse bad data as a whole before any pass over the model (called by :meth:`Influence.fit`); raise
        :class:`InputError`. Does nothing by default: :meth:`check_batch` sees every batch as the passes read it."""

    def describe(self) -> dict[str, Any]:
        """The settings that define this task, for result metadata."""
        out = {"task": type(self).__name__, "l2": self.l2, "params": list(self.param_names)}
        return {**out, "params_excluded": list(self.excluded_params)} if self.excluded_params else out

    # -- the likelihood, for solvers that draw labels from the model (K-FAC/EK-FAC) ---------------------
    #: ``"classification"`` (the loss is the cross-entropy of :meth:`outputs` at :meth:`labels`: softmax over the
    #: last dimension, or logistic on one output), ``"regression"`` (squared error averaged over outputs), or
    #: None: the loss is not such a likelihood, and K-FAC/EK-FAC refuse the task when Influence is built.
    fisher: str | None = None

    def outputs(self, params: Params, batch: Batch) -> torch.Tensor:
        """The model outputs the loss is a likelihood of, aligned with :meth:`labels` (tasks with ``fisher``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no likelihood (`fisher` is None).")

    def labels(self, batch: Batch) -> torch.Tensor:
        """The labels of a batch, aligned with :meth:`outputs` (tasks with ``fisher``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no likelihood (`fisher` is None).")

    def with_labels(self, batch: Batch, labels: torch.Tensor) -> Any:
        """``batch`` with its labels replaced (tasks with ``fisher``; K-FAC's sampled labels)."""
        raise NotImplementedError(f"{type(self).__name__} declares no likelihood (`fisher` is None).")

    def label_mask(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Which label positions carry a loss (None: all)."""
        return None

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """:meth:`loss` given this batch's :meth:`outputs` (computed once, e.g. by K-FAC's passes, which draw labels
        from
        the outputs of the same forward pass they back-propagate). Only where :meth:`has_loss_from_outputs`."""
        raise NotImplementedError(f"{type(self).__name__} computes its loss only from the parameters (loss()).")

    def has_loss_from_outputs(self) -> bool:
        """Whether :meth:`loss_from_outputs` is the loss: the class that defines it also defines the :meth:`loss` in use
        (a subclass that redefines ``loss`` alone keeps its own, and the passes run their forward twice)."""
        owner = next(c for c in type(self).__mro__ if "loss_from_outputs" in c.__dict__)
        return owner is not Task and type(self).loss is owner.loss

    def position_mask(self, batch: Batch) -> torch.Tensor | None:
        """``(B, T)`` booleans marking the real positions of a padded sequence batch (None: no padding)."""
        return None

    def check_mode(self) -> None:
        """Refuse a model whose dropout or batch-norm layers are in training mode: its loss would be random or depend on
        the batch, and every influence computed from it a different wrong number. Checked when Influence is built."""
        stochastic = (nn.Dropout, nn.modules.batchnorm._BatchNorm)
        active = [
            f"{type(m).__name__} {name!r}" if name else type(m).__name__
            for name, m in self.model.named_modules()
            if isinstance(m, stochastic) and m.training
        ]
        if active:
            raise InputError(
                f"the model's {', '.join(active[:3])}{' ...' if len(active) > 3 else ''} "
                f"{'is' if len(active) == 1 else 'are'} in "
                "training mode (dropout or batch norm), so its loss is random or depends on the batch; call "
                "model.eval() "
                "before building the Influence."
            )

    def check_forward(self, params: Params, batch: Batch, name: str) -> None:
        """Run the loss on ``batch`` (one example) and turn a failure inside the model into an InputError that names the
        data set, the inputs' shapes and dtypes and what the model's first layer expects (torch's own message kept)."""
        try:
            with torch.no_grad():
                self.loss(params, batch)
        except InfluenceKitError:
            raise
        except (RuntimeError, TypeError, IndexError, ValueError) as exc:
            raise forward_error(self.model, batch, name, exc) from exc


class _SupervisedTask(Task):
    """A task whose batches are ``(inputs..., target)`` tuples or dicts with an input and a target key."""

    def __init__(
        self,
        model: nn.Module,
        *,
        l2: float = 0.0,
        params: ParamSelector = None,
        input_key: str = "x",
        target_key: str = "y",
    ) -> None:
        super().__init__(model, l2=l2, params=params)
        self.input_key = input_key
        self.target_key = target_key

    def split(self, batch: Batch) -> tuple[tuple[Any, ...], torch.Tensor]:
        """Split a batch into the model's positional inputs and the target."""
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return tuple(batch[:-1]), batch[-1]
        if isinstance(batch, dict):
            missing = [k for k in (self.input_key, self.target_key) if k not in batch]
            if missing:
                raise InputError(
                    f"a dict batch must have the keys `input_key`={self.input_key!r} and `target_key`="
                    f"{self.target_key!r}. Got keys {sorted(batch)}; pass input_key=/target_key= to the task."
                )
            return (batch[self.input_key],), batch[self.target_key]
        raise InputError(
            f"{type(self).__name__} needs batches of (inputs, target). Got a {type(batch).__name__}; "
            "pass the data as an (X, y) tuple, a dict, or a Dataset whose items are (x, y)."
        )

    def outputs(self, params: Params, batch: Batch) -> torch.Tensor:
        inputs, _ = self.split(batch)
        return self.forward(params, *inputs)

    def labels(self, batch: Batch) -> torch.Tensor:
        return self.split(batch)[1]

    def with_labels(self, batch: Batch, labels: torch.Tensor) -> Any:
        if isinstance(batch, dict):
            return {**batch, self.target_key: labels}
        return type(batch)((*batch[:-1], labels)) if isinstance(batch, tuple) else [*batch[:-1], labels]

    @property
    def fisher(self) -> str | None:  # type: ignore[override]
        """The likelihood of :class:`ClassificationTask`/:class:`RegressionTask`, unless a subclass redefines the
        loss."""
        for cls, kind in ((ClassificationTask, "classification"), (RegressionTask, "regression")):
            if isinstance(self, cls) and type(self).loss is cls.loss:
                return kind
        return None


MEASUREMENTS = ("loss", "margin")


class ClassificationTask(_SupervisedTask):
    """Cross-entropy on logits ``(B, C)`` with integer labels, or logistic loss on one logit ``(B,)``/``(B, 1)``.

    With a single output the labels must be 0/1 and the loss is ``log(1 + exp(-s·f(x)))`` with s = ±1,
    the binary logistic regression of the paper.

    ``measurement``: what the test side measures, ``"loss"`` (default, the paper's I_up,loss) or ``"margin"``: the
    correct class's logit minus the log-sum-exp of the others (s·f(x) for one logit), the output the linear
    datamodeling score is usually measured on (Park et al. 2023); influence then predicts the change of the margin.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        l2: float = 0.0,
        params: ParamSelector = None,
        input_key: str = "x",
        target_key: str = "y",
        measurement: str = "loss",
    ) -> None:
        super().__init__(model, l2=l2, params=params, input_key=input_key, target_key=target_key)
        self.measured = check_choice("measurement", measurement, MEASUREMENTS)

    def measurement(self, params: Params, batch: Batch) -> torch.Tensor:
        if self.measured == "loss":
            return self.loss(params, batch)
        return self.margins(params, batch)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        return out if self.measured == "loss" else {**out, "measurement": self.measured}

    def margins(self, params: Params, batch: Batch) -> torch.Tensor:
        """Per example, the correct class's logit minus the log-sum-exp of the other logits, ``(B,)``."""
        logits, target = self.outputs(params, batch), self.labels(batch)
        if logits.dim() == 2 and logits.shape[1] > 1:
            return logit_margins(logits, target)
        logits = logits.reshape(-1)
        return torch.where(target.reshape(-1) > 0, logits, -logits)

    def _n_outputs(self, inputs: tuple[Any, ...], name: str = "the data") -> int:
        # the number of logits per example, from one forward pass on one example (cached)
        if getattr(self, "_outputs", None) is None:
            one = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
            try:
                with torch.no_grad():
                    logits = self.forward(self.params(), *one)
            except InfluenceKitError:
                raise
            except (RuntimeError, TypeError, IndexError, ValueError) as exc:
                raise forward_error(self.model, one, name, exc) from exc
            self._outputs = int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 1
        return self._outputs

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        inputs, target = self.split(batch)
        if not isinstance(target, torch.Tensor) or target.dim() != 1:
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            if isinstance(target, torch.Tensor):
                shape = "(n" + "".join(f", {d}" for d in target.shape[1:]) + ")"
            raise InputError(
                f"ClassificationTask labels in `{name}` must be a 1-D tensor of shape (n,). Got shape {shape}; "
                "flatten them with y.reshape(-1)."
            )
        classes = self._n_outputs(inputs, name)
        if classes > 1:
            if target.is_floating_point() or target.is_complex():
                raise InputError(
                    f"ClassificationTask labels in `{name}` must be integer class indices (torch.long). Got dtype "
                    f"{target.dtype}; convert them with y.long()."
                )
            bad = ((target < 0) | (target >= classes)).nonzero().flatten()
            allowed = f"0..{classes - 1} (the model has {classes} outputs)"
        else:
            bad = ((target != 0) & (target != 1)).nonzero().flatten()
            allowed = "0 or 1 (the model has one output: binary logistic loss)"
        _refuse_labels("ClassificationTask", name, allowed, target, bad, offset)

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(params, batch), batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits, target = outputs, self.labels(batch)
        if not isinstance(logits, torch.Tensor):
            raise InputTypeError(
                f"the model must return a logits tensor for ClassificationTask. Got {type(logits).__name__}."
            )
        if logits.dim() == 2 and logits.shape[1] > 1:
            if target.is_floating_point() or target.is_complex():
                raise InputError(
                    f"ClassificationTask labels must be integer class indices (torch.long). Got dtype {target.dtype}; "
                    "convert them with y.long()."
                )
            return F.cross_entropy(logits, target.long(), reduction="none")
        if logits.dim() == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.dim() != 1:
            raise InputError(f"ClassificationTask expects logits of shape (B, C) or (B,). Got {tuple(logits.shape)}.")
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")


class RegressionTask(_SupervisedTask):
    """Squared error per example, averaged over output dimensions: mean_j (f(x)_j − y_j)²."""

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(params, batch), batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        pred, target = outputs, self.labels(batch)
        if not target.is_floating_point():
            target = target.to(pred.dtype)
        if pred.shape != target.shape:
            if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
                pred = pred[..., 0]
            else:
                raise InputError(
                    f"RegressionTask needs predictions and targets of the same shape. Got predictions "
                    f"{tuple(pred.shape)} and targets {tuple(target.shape)}."
                )
        err = (pred - target) ** 2
        return err.reshape(err.shape[0], -1).mean(dim=1)


def logit_margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of ``logits (B, C)``, the ``target`` class's logit minus the log-sum-exp of the others, ``(B,)`` (by
    gather and scatter, so that it also runs under ``vmap``)."""
    correct = logits.gather(1, target.long()[:, None])[:, 0]
    others = logits.scatter(1, target.long()[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def smooth_hinge(margin: torch.Tensor, temperature: float) -> torch.Tensor:
    """t·log(1 + exp((1 − m)/t)) (Koh & Liang 2017, §4.1), or the hinge max(0, 1 − m) at t = 0.

    It tends to the hinge as t → 0 (from above, by at most t·log 2 at the kink), and unlike the hinge it
    has a second derivative, (1/t)·σ((1−m)/t)·(1 − σ((1−m)/t)), that is non-zero near the margin.
    """
    if temperature == 0.0:
        return torch.relu(1.0 - margin)
    return temperature * F.softplus((1.0 - margin) / temperature)


class SmoothHingeTask(_SupervisedTask):
    """A binary linear-SVM loss on one output f(x) ``(B,)``/``(B, 1)`` and labels 0/1 (mapped to s = ±1).

    ℓ(z, θ) = smooth_hinge(s·f(x), t) with temperature ``t`` ≥ 0: t = 0 is the true hinge, whose
    Hessian is zero wherever it is defined (influence then sees only the L2 term), and t > 0 smooths it
    so that points near the margin carry curvature. The paper's Figure 3 trains with the true hinge and
    computes influence with t = 0, 0.001 and 0.1.

    Args:
        temperature: t of the training-side loss (and of the Hessian).
        measurement_temperature: t of the test-side :meth:`measurement`; ``None`` (default) uses
            ``temperature``. Pass 0 to measure the true hinge test loss whatever smoothing the influence uses.
        l2, params, input_key, target_key: as in :class:`ClassificationTask`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 0.001,
        measurement_temperature: float | None = None,
        l2: float = 0.0,
        params: ParamSelector = None,
        input_key: str = "x",
        target_key: str = "y",
    ) -> None:
        super().__init__(model, l2=l2, params=params, input_key=input_key, target_key=target_key)
        self.temperature = check_number("temperature", temperature, low=0.0)
        self.measurement_temperature = (
            self.temperature
            if measurement_temperature is None
            else check_number("measurement_temperature", measurement_temperature, low=0.0)
        )

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        _, target = self.split(batch)
        if not isinstance(target, torch.Tensor) or target.dim() != 1:
            raise InputError(f"SmoothHingeTask labels in `{name}` must be a 1-D tensor of 0/1, shape (n,).")
        bad = ((target != 0) & (target != 1)).nonzero().flatten()
        _refuse_labels("SmoothHingeTask", name, "0 or 1 (mapped to -1/+1)", target, bad, offset)

    def margins(self, params: Params, batch: Batch) -> torch.Tensor:
        """s·f(x) per example, shape ``(B,)``."""
        inputs, target = self.split(batch)
        out = self.forward(params, *inputs)
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 1:
            raise InputError(
                f"SmoothHingeTask needs one output per example, shape (B,) or (B, 1). Got {tuple(out.shape)}."
            )
        return (2.0 * target.to(out.dtype) - 1.0) * out

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return smooth_hinge(self.margins(params, batch), self.temperature)

    def measurement(self, params: Params, batch: Batch) -> torch.Tensor:
        return smooth_hinge(self.margins(params, batch), self.measurement_temperature)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "temperature": self.temperature,
            "measurement_temperature": self.measurement_temperature,
        }
