"""Hugging Face transformers as influence tasks: sequence classification, token classification, causal LM.

Batches are dicts of tensors as a tokenizer produces them (``input_ids``, ``attention_mask``, optionally
``token_type_ids``, and ``labels``); the model is any ``transformers`` model (``AutoModelFor...``) or any
module called with those keyword arguments that returns logits (a tensor, or an output with ``.logits``).
Padding is respected: the losses ignore padded positions (``attention_mask == 0``, and labels equal to
``ignore_index``), and :meth:`HFTask.position_mask` tells K-FAC which positions are real.

Per-example losses (shape ``(B,)``), so that influence is of whole training sequences:

- :class:`SequenceClassificationTask`: cross-entropy of the sequence's logits ``(B, C)``;
- :class:`TokenClassificationTask`: the cross-entropy summed (or averaged) over the labelled tokens ``(B, T, C)``;
- :class:`CausalLMTask`: the next-token cross-entropy summed (or averaged) over the target tokens. With
  ``reduction="sum"`` (default) the loss is a sum over tokens, so influence on a test sequence is the sum of
  the influences on its tokens (:func:`per_token`).

Each declares its likelihood (``fisher = "classification"``), so K-FAC/EK-FAC can draw labels from the
model's own predictions at every real position (:mod:`influencekit.solvers.fisher`).

Data: a list of tokenised examples (each a dict of 1-D tensors, ``labels`` a 0-d or 1-D tensor) or a Hugging
Face ``datasets.Dataset`` is accepted wherever influencekit takes data; examples of different lengths are
padded per batch by :func:`pad_collate` (``input_ids`` with ``pad_token_id``, ``labels`` with ``-100``,
everything else with 0).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import check_choice
from .data.examples import IGNORE_INDEX, pad_collate
from .errors import InputError, InputTypeError
from .prefix import PrefixCache, PrefixPlan, is_prefix_key
from .task import Params, ParamSelector, Task

__all__ = ["cache_prefix", "PrefixCache", "PooledClassifier", "HFTask", "SequenceClassificationTask", "TokenClassificationTask", "CausalLMTask", "pad_collate", "per_token", "IGNORE_INDEX"]

REDUCTIONS = ("sum", "mean")
POOLINGS = ("mean", "cls")


class PooledClassifier(nn.Module):
    """An encoder (``transformers.AutoModel``, e.g. a sentence-transformers checkpoint) with a pooled Linear head.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns logits ``(B, num_labels)`` of the mean of
    the last hidden states over the real positions (``pooling="mean"``, as sentence-transformers pools) or of the
    first position (``pooling="cls"``). The head is ``self.head``: ``params="head"`` selects it alone,
    ``params=["encoder.encoder.layer.5.*", "head"]`` the last block of a BERT-style encoder too.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, *, pooling: str = "mean") -> None:
        super().__init__()
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise InputTypeError(f"`encoder` must be a transformers model with `config.hidden_size`. Got {type(encoder).__name__}.")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise InputError(f"`num_labels` must be an integer >= 2. Got {num_labels!r}.")
        self.encoder, self.pooling = encoder, check_choice("pooling", pooling, POOLINGS)
        self.head = nn.Linear(hidden, num_labels, dtype=next(encoder.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        if attention_mask is None:
            return self.head(hidden.mean(dim=1))
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0))


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise InputTypeError(f"the model must return logits (a tensor, or an output with `.logits`). Got {type(output).__name__}.")
    return logits


class HFTask(Task):
    """A task on dict batches of tokenised text for a transformers model (see the module docstring).

    Args:
        model: the model; put it in eval mode (``model.eval()``: dropout makes the loss random).
        l2, params: as for :class:`~influencekit.Task` (``params=["classifier"]`` selects the head only).
        label_key: the batch key of the labels (default ``"labels"``).
        input_keys: the batch keys passed to the model; default: every key of the batch that the model's
            ``forward`` accepts, except the labels.
    """

    fisher = "classification"

    def __init__(self, model: nn.Module, *, l2: float = 0.0, params: ParamSelector = None, label_key: str = "labels",
                 input_keys: Sequence[str] | None = None) -> None:
        super().__init__(model, l2=l2, params=params)
        self.label_key = label_key
        self.target_key = label_key
        self.input_key = "inputs_embeds"  # where perturbation_influence finds a floating input, if given
        self.input_keys = None if input_keys is None else tuple(input_keys)
        try:
            accepted = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            accepted = {}
        self._accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()) or not accepted
        self._accepted = set(accepted)
        self.prefix_plan: PrefixPlan | None = None

    def use_prefix_plan(self, plan: PrefixPlan) -> None:
        """Replay the frozen modules of ``plan`` from batches that carry their outputs (:func:`cache_prefix`)."""
        if self.prefix_plan is not None and self.prefix_plan.describe() != plan.describe():
            raise InputError(
                f"this task already replays the prefix {self.prefix_plan.describe()} and a new cache needs {plan.describe()}: "
                "build the caches of one Influence from the same task and parameters."
            )
        self.prefix_plan = plan

    def forward(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        """The model with ``params``, its scaled-dot-product attention on the math kernel: the fused CPU/flash
        kernels have no second derivative, which Hessian-vector products need (same values to round-off)."""
        with sdpa_kernel([SDPBackend.MATH]):
            return super().forward(params, *args, **kwargs)

    # -- batches ------------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> dict[str, Any]:
        """The model's keyword inputs of a batch: ``input_keys``, or every accepted key but the labels."""
        if not isinstance(batch, Mapping):
            raise InputError(f"{type(self).__name__} needs dict batches (input_ids, attention_mask, labels, ...). Got {type(batch).__name__}.")
        if self.input_keys is not None:
            missing = [k for k in self.input_keys if k not in batch]
            if missing:
                raise InputError(f"the batch lacks the `input_keys` {missing}. Got keys {sorted(batch)}.")
            return {k: batch[k] for k in self.input_keys}
        return {k: v for k, v in batch.items() if k != self.label_key and not is_prefix_key(k) and (self._accepts_any or k in self._accepted)}

    def labels(self, batch: Any) -> torch.Tensor:
        """The labels the loss is computed against, aligned with :meth:`outputs`."""
        if not isinstance(batch, Mapping) or self.label_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise InputError(f"{type(self).__name__} needs the labels under `label_key`={self.label_key!r}. Got {keys}.")
        return batch[self.label_key]

    def with_labels(self, batch: Any, labels: torch.Tensor) -> Any:
        """``batch`` with the labels replaced by ``labels`` (aligned with :meth:`outputs`)."""
        return {**batch, self.label_key: labels}

    def split(self, batch: Any) -> tuple[tuple[Any, ...], torch.Tensor]:
        return (self.inputs(batch),), self.labels(batch)

    def outputs(self, params: Params, batch: Any) -> torch.Tensor:
        """The logits the loss is computed from, aligned with :meth:`labels`. A batch from :func:`cache_prefix`
        replays the frozen prefix from its stored outputs."""
        if self.prefix_plan is not None and any(is_prefix_key(k) for k in batch):
            with self.prefix_plan.replay(self.model, batch):
                return _logits(self.forward(params, **self.inputs(batch)))
        return _logits(self.forward(params, **self.inputs(batch)))

    def position_mask(self, batch: Any) -> torch.Tensor | None:
        """``(B, T)`` booleans, True at the real (not padded) positions of the model's sequence, or None."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return None if mask is None else mask.bool()

    def label_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Which label positions carry a loss (not ``IGNORE_INDEX``)."""
        return labels != IGNORE_INDEX

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_key": self.label_key}


class SequenceClassificationTask(HFTask):
    """Cross-entropy of each sequence's logits ``(B, C)`` against integer ``labels`` ``(B,)``. Works for
    ``AutoModelForSequenceClassification`` and for any model returning ``(B, C)`` logits (e.g. a pooled encoder
    with a Linear head)."""

    def check_batch(self, batch: Any, name: str, offset: int) -> None:
        labels = self.labels(batch)
        if labels.dim() != 1 or labels.is_floating_point():
            raise InputError(
                f"SequenceClassificationTask labels in `{name}` must be integer classes of shape (n,). Got "
                f"{labels.dtype} of shape {tuple(labels.shape)}; a 0-d `labels` tensor per example stacks to (n,)."
            )

    def loss(self, params: Params, batch: Any) -> torch.Tensor:
        logits, labels = self.outputs(params, batch), self.labels(batch)
        if logits.dim() != 2:
            raise InputError(f"SequenceClassificationTask needs logits of shape (B, C). Got {tuple(logits.shape)}.")
        return F.cross_entropy(logits, labels.long(), reduction="none")


class _TokenLoss(HFTask):
    """The per-token cross-entropy of logits ``(B, T, C)`` against labels ``(B, T)``, reduced per sequence."""

    def __init__(self, model: nn.Module, *, l2: float = 0.0, params: ParamSelector = None, label_key: str = "labels",
                 input_keys: Sequence[str] | None = None, reduction: str = "sum") -> None:
        super().__init__(model, l2=l2, params=params, label_key=label_key, input_keys=input_keys)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def token_losses(self, params: Params, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T')`` cross-entropy per aligned position (0 where no loss) and the mask of positions with a loss."""
        logits, labels = self.outputs(params, batch), self.labels(batch)
        mask = self.label_mask(labels)
        safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
        losses = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")
        return losses * mask.to(losses.dtype), mask

    def loss(self, params: Params, batch: Any) -> torch.Tensor:
        losses, mask = self.token_losses(params, batch)
        total = losses.sum(dim=1)
        return total if self.reduction == "sum" else total / mask.sum(dim=1).clamp_min(1).to(total.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reduction": self.reduction}


class TokenClassificationTask(_TokenLoss):
    """Token classification (NER, tagging): logits ``(B, T, C)``, labels ``(B, T)`` with ``-100`` where no label
    counts (padding, sub-word continuations); the loss of a sequence is the sum (or mean) over its labelled tokens."""

    def check_batch(self, batch: Any, name: str, offset: int) -> None:
        labels = self.labels(batch)
        if labels.dim() != 2:
            raise InputError(f"TokenClassificationTask labels in `{name}` must have shape (n, T). Got {tuple(labels.shape)}.")


class CausalLMTask(_TokenLoss):
    """Next-token prediction: the logits at position t predict token t + 1; the loss of a sequence is the sum (or
    mean) of the cross-entropies of its target tokens. Targets are ``labels`` when the batch has them (``-100``
    excluded, as in transformers), else ``input_ids`` where ``attention_mask`` is 1."""

    def labels(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise InputError("CausalLMTask needs dict batches with `input_ids`. Got " + (str(sorted(batch)) if isinstance(batch, Mapping) else type(batch).__name__) + ".")
        if self.label_key in batch:
            full = batch[self.label_key]
        else:
            full = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is not None:
                full = torch.where(mask.bool(), full, torch.full_like(full, IGNORE_INDEX))
        return full[:, 1:]

    def with_labels(self, batch: Any, labels: torch.Tensor) -> Any:
        first = torch.full_like(labels[:, :1], IGNORE_INDEX)
        return {**batch, self.label_key: torch.cat([first, labels.to(batch["input_ids"].dtype)], dim=1)}

    def outputs(self, params: Params, batch: Any) -> torch.Tensor:
        return super().outputs(params, batch)[:, :-1]


def per_token(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tokenised example of a :class:`CausalLMTask` (dict of 1-D tensors) as a batch of its target tokens:
    row j keeps only the j-th target token's label (the others ``-100``). ``inf.scores(per_token(x))`` then gives
    per-token influence, whose rows sum to the influence on the whole sequence (``reduction="sum"``)."""
    ids = torch.as_tensor(example["input_ids"])
    if ids.dim() != 1:
        raise InputError(f"per_token takes one example: `input_ids` of shape (T,). Got {tuple(ids.shape)}.")
    labels = torch.as_tensor(example["labels"]) if "labels" in example else ids.clone()
    if "labels" not in example and "attention_mask" in example:
        labels = torch.where(torch.as_tensor(example["attention_mask"]).bool(), labels, torch.full_like(labels, IGNORE_INDEX))
    targets = [t for t in range(1, len(ids)) if int(labels[t]) != IGNORE_INDEX]
    if not targets:
        raise InputError("the example has no target token (every label is -100 or masked).")
    n = len(targets)
    rows = torch.full((n, len(ids)), IGNORE_INDEX, dtype=labels.dtype)
    for j, t in enumerate(targets):
        rows[j, t] = labels[t]
    batch = {k: torch.as_tensor(v).unsqueeze(0).expand(n, -1).clone() for k, v in example.items() if k != "labels"}
    batch["labels"] = rows
    return batch


def cache_prefix(task: HFTask, data: Any, *, batch_size: int = 16, folder: str | os.PathLike | None = None,
                 progress: bool = False) -> PrefixCache:
    """``data`` with the outputs of the model's frozen prefix attached (:class:`~influencekit.prefix.PrefixCache`):
    pass it in place of ``data`` to :class:`~influencekit.Influence`, ``scores``, ``fit_lbfgs``, and the task's
    forward runs only the part downstream of ``task``'s selected parameters. ``folder=``: keep the outputs on disk
    there (resumable, checked, memory-mapped when read) instead of in memory."""
    return PrefixCache(task, data, batch_size=batch_size, folder=folder, progress=progress)
