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

from ..core.checks import check_choice
from ..core.errors import InputError, InputTypeError
from ..core.task import Params, ParamSelector, Task
from ..data.examples import IGNORE_INDEX, Batch, DataSource, Examples, pad_collate
from .prefix import PrefixCache, PrefixPlan, is_prefix_key

__all__ = [
    "cache_prefix",
    "PrefixCache",
    "PooledClassifier",
    "HFTask",
    "SequenceClassificationTask",
    "TokenClassificationTask",
    "CausalLMTask",
    "pad_collate",
    "per_token",
    "IGNORE_INDEX",
]

REDUCTIONS = ("sum", "mean")
CHECK_CHUNK = 1024  # examples collated at a time by HFTask.check_examples
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
            raise InputTypeError(
                f"`encoder` must be a transformers model with `config.hidden_size`. Got {type(encoder).__name__}."
            )
        if not isinstance(num_labels, int) or num_labels < 2:
            raise InputError(f"`num_labels` must be an integer >= 2. Got {num_labels!r}.")
        self.encoder, self.pooling = encoder, check_choice("pooling", pooling, POOLINGS)
        self.head = nn.Linear(hidden, num_labels, dtype=next(encoder.parameters()).dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        if attention_mask is None:
            return self.head(hidden.mean(dim=1))
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0))


def _input_embeddings(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding (``get_input_embeddings()``, also through a :class:`PooledClassifier`'s encoder)."""
    for owner in (model, getattr(model, "encoder", None)):
        getter = getattr(owner, "get_input_embeddings", None)
        try:
            found = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            found = None
        if isinstance(found, nn.Embedding):
            return found
    return None


def _position_limit(model: nn.Module) -> int | None:
    """The most tokens a sequence may have: the rows of a learned absolute position embedding (``position_embeddings``,
    GPT-2's ``wpe``), less RoBERTa's offset past its padding row; None for a model without one (rotary positions)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in (
            "position_embeddings",
            "wpe",
            "embed_positions",
        ):
            pad = module.padding_idx
            return module.num_embeddings - (0 if pad is None else pad + 1)
    return None


def _first(bad: torch.Tensor, offset: int) -> str:
    """ "example i" (and how many more) for the rows of a boolean ``(B,)`` tensor that are True."""
    rows = bad.nonzero().flatten().tolist()
    return f"example {offset + rows[0]}" + (f" (and {len(rows) - 1} more)" if len(rows) > 1 else "")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise InputTypeError(
            f"the model must return logits (a tensor, or an output with `.logits`). Got {type(output).__name__}."
        )
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

    def __init__(
        self,
        model: nn.Module,
        *,
        l2: float = 0.0,
        params: ParamSelector = None,
        label_key: str = "labels",
        input_keys: Sequence[str] | None = None,
    ) -> None:
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
        embedding = _input_embeddings(self.model)
        self.vocab_size = None if embedding is None else embedding.num_embeddings
        self.max_positions = _position_limit(self.model)

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        """Refuse token inputs the model would fail on inside torch, or score silently wrong: ids that are not integers
        or lie outside the vocabulary, sequences longer than the model's positions, examples with no real token."""
        if not isinstance(batch, Mapping):
            return
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.dtype == torch.bool:
                raise InputError(
                    f"`input_ids` in `{name}` must be integer token ids. Got {ids.dtype}; convert them with "
                    ".long(), or pass the tokenizer's output as it is."
                )
            if self.vocab_size is not None:
                outside = (ids < 0) | (ids >= self.vocab_size)
                if bool(outside.any()):
                    raise InputError(
                        f"`input_ids` in `{name}` must be ids of the model's vocabulary (0..{self.vocab_size - 1}). "
                        "Got "
                        f"{int(ids[outside][0])} in {_first(outside.any(dim=-1), offset)}; tokenise with the model's "
                        "own "
                        "tokenizer, and set the padding id to one of the vocabulary."
                    )
            if self.max_positions is not None and ids.dim() == 2 and ids.shape[1] > self.max_positions:
                lengths = mask.sum(dim=1) if isinstance(mask, torch.Tensor) else torch.full((len(ids),), ids.shape[1])
                raise InputError(
                    f"`{name}` holds a sequence of {ids.shape[1]} tokens ({_first(lengths == lengths.max(), offset)}), "
                    f"more than the model's {self.max_positions} positions. Tokenise with truncation=True, "
                    f"max_length={self.max_positions} (or shorter)."
                )
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            empty = mask.sum(dim=1) == 0
            if bool(empty.any()):
                raise InputError(
                    f"{_first(empty, offset)} of `{name}` has an attention mask of zeros: no real token to "
                    "read. Remove it, or check how the batch was padded."
                )

    def check_examples(self, data: DataSource, name: str) -> None:
        """:meth:`check_batch` on every example of tokenised ``data`` before the model runs (collating token ids costs
        little); a :class:`PrefixCache` was checked when it was built."""
        if isinstance(data, PrefixCache):
            return
        examples = Examples(data, name=name)
        for lo, batch in examples.batches(CHECK_CHUNK):
            self.check_batch(batch, name, lo)

    def _check_classes(self, labels: torch.Tensor, name: str, offset: int) -> None:
        """Integer labels in 0..C-1 (or ``IGNORE_INDEX``) for a model whose config states its C classes."""
        classes = getattr(getattr(self.model, "config", None), "num_labels", None)
        head = getattr(self.model, "head", None)
        classes = (
            head.out_features if isinstance(self.model, PooledClassifier) and isinstance(head, nn.Linear) else classes
        )
        if not isinstance(classes, int) or classes < 2:
            return
        outside = ((labels < 0) | (labels >= classes)) & (labels != IGNORE_INDEX)
        if bool(outside.any()):
            rows = outside.reshape(len(labels), -1).any(dim=1)
            raise InputError(
                f"labels in `{name}` must be classes 0..{classes - 1} of the model's {classes}. Got "
                f"{int(labels[outside][0])} in {_first(rows, offset)}; map the labels to the model's classes, "
                "or build the model with num_labels= the number of classes."
            )

    def use_prefix_plan(self, plan: PrefixPlan) -> None:
        """Replay the frozen modules of ``plan`` from batches that carry their outputs (:func:`cache_prefix`)."""
        if self.prefix_plan is not None and self.prefix_plan.describe() != plan.describe():
            raise InputError(
                f"this task already replays the prefix {self.prefix_plan.describe()} and a new cache needs "
                f"{plan.describe()}: "
                "build the caches of one Influence from the same task and parameters."
            )
        self.prefix_plan = plan

    def forward(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        """The model with ``params``, its scaled-dot-product attention on the math kernel: the fused CPU/flash
        kernels have no second derivative, which Hessian-vector products need (same values to round-off)."""
        with sdpa_kernel([SDPBackend.MATH]):
            return super().forward(params, *args, **kwargs)

    # -- batches ------------------------------------------------------------------------------------
    def inputs(self, batch: Batch) -> dict[str, Any]:
        """The model's keyword inputs of a batch: ``input_keys``, or every accepted key but the labels."""
        if not isinstance(batch, Mapping):
            raise InputError(
                f"{type(self).__name__} needs dict batches (input_ids, attention_mask, labels, ...). Got "
                f"{type(batch).__name__}."
            )
        if self.input_keys is not None:
            missing = [k for k in self.input_keys if k not in batch]
            if missing:
                raise InputError(f"the batch lacks the `input_keys` {missing}. Got keys {sorted(batch)}.")
            return {k: batch[k] for k in self.input_keys}
        return {
            k: v
            for k, v in batch.items()
            if k != self.label_key and not is_prefix_key(k) and (self._accepts_any or k in self._accepted)
        }

    def labels(self, batch: Batch) -> torch.Tensor:
        """The labels the loss is computed against, aligned with :meth:`outputs`."""
        if not isinstance(batch, Mapping) or self.label_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise InputError(
                f"{type(self).__name__} needs the labels under `label_key`={self.label_key!r}. Got {keys}."
            )
        return batch[self.label_key]

    def with_labels(self, batch: Batch, labels: torch.Tensor) -> Any:
        """``batch`` with the labels replaced by ``labels`` (aligned with :meth:`outputs`)."""
        return {**batch, self.label_key: labels}

    def split(self, batch: Batch) -> tuple[tuple[Any, ...], torch.Tensor]:
        return (self.inputs(batch),), self.labels(batch)

    def outputs(self, params: Params, batch: Batch) -> torch.Tensor:
        """The logits the loss is computed from, aligned with :meth:`labels`. A batch from :func:`cache_prefix`
        replays the frozen prefix from its stored outputs."""
        if self.prefix_plan is not None and any(is_prefix_key(k) for k in batch):
            with self.prefix_plan.replay(self.model, batch):
                return _logits(self.forward(params, **self.inputs(batch)))
        return _logits(self.forward(params, **self.inputs(batch)))

    def position_mask(self, batch: Batch) -> torch.Tensor | None:
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

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        super().check_batch(batch, name, offset)
        labels = self.labels(batch)
        if labels.dim() != 1 or labels.is_floating_point():
            raise InputError(
                f"SequenceClassificationTask labels in `{name}` must be integer classes of shape (n,). Got "
                f"{labels.dtype} of shape {tuple(labels.shape)}; a 0-d `labels` tensor per example stacks to (n,)."
            )
        self._check_classes(labels, name, offset)

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(params, batch), batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits, labels = outputs, self.labels(batch)
        if logits.dim() != 2:
            raise InputError(f"SequenceClassificationTask needs logits of shape (B, C). Got {tuple(logits.shape)}.")
        return F.cross_entropy(logits, labels.long(), reduction="none")


class _TokenLoss(HFTask):
    """The per-token cross-entropy of logits ``(B, T, C)`` against labels ``(B, T)``, reduced per sequence."""

    def __init__(
        self,
        model: nn.Module,
        *,
        l2: float = 0.0,
        params: ParamSelector = None,
        label_key: str = "labels",
        input_keys: Sequence[str] | None = None,
        reduction: str = "sum",
    ) -> None:
        super().__init__(model, l2=l2, params=params, label_key=label_key, input_keys=input_keys)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def token_losses(self, params: Params, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T')`` cross-entropy per aligned position (0 where no loss) and the mask of positions with a loss."""
        return self._token_losses(self.outputs(params, batch), batch)

    def _token_losses(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.labels(batch)
        mask = self.label_mask(labels)
        safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
        # classes last, rows flattened: over a transposed (B, C, T) view the log-softmax strides through memory (1.7x
        # slower forward and backward at GPT-2's vocabulary)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none").view(
            safe.shape
        )
        return losses * mask.to(losses.dtype), mask

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(params, batch), batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        losses, mask = self._token_losses(outputs, batch)
        total = losses.sum(dim=1)
        return total if self.reduction == "sum" else total / mask.sum(dim=1).clamp_min(1).to(total.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reduction": self.reduction}


class TokenClassificationTask(_TokenLoss):
    """Token classification (NER, tagging): logits ``(B, T, C)``, labels ``(B, T)`` with ``-100`` where no label
    counts (padding, sub-word continuations); the loss of a sequence is the sum (or mean) over its labelled tokens."""

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        super().check_batch(batch, name, offset)
        labels = self.labels(batch)
        if labels.dim() != 2 or labels.is_floating_point():
            raise InputError(
                f"TokenClassificationTask labels in `{name}` must be integer classes of shape (n, T). Got "
                f"{labels.dtype} of shape {tuple(labels.shape)}."
            )
        self._check_classes(labels, name, offset)


class CausalLMTask(_TokenLoss):
    """Next-token prediction: the logits at position t predict token t + 1; the loss of a sequence is the sum (or
    mean) of the cross-entropies of its target tokens. Targets are ``labels`` when the batch has them (``-100``
    excluded, as in transformers), else ``input_ids`` where ``attention_mask`` is 1.

    :meth:`outputs` are the model's logits at every position ``(B, T, C)`` and :meth:`labels` the next tokens
    ``(B, T)``, the last position's ``-100`` (nothing follows it): the logits are used as the model returns them
    (slicing off the last position would copy them, a ``T × vocabulary`` tensor per sequence, at every loss)."""

    def labels(self, batch: Batch) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise InputError(
                "CausalLMTask needs dict batches with `input_ids`. Got "
                + (str(sorted(batch)) if isinstance(batch, Mapping) else type(batch).__name__)
                + "."
            )
        if self.label_key in batch:
            full = batch[self.label_key]
        else:
            full = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is not None:
                full = torch.where(mask.bool(), full, torch.full_like(full, IGNORE_INDEX))
        return torch.cat([full[:, 1:], torch.full_like(full[:, :1], IGNORE_INDEX)], dim=1)

    def check_batch(self, batch: Batch, name: str, offset: int) -> None:
        super().check_batch(batch, name, offset)
        targets = self.labels(batch)
        if self.vocab_size is not None:
            outside = ((targets < 0) | (targets >= self.vocab_size)) & (targets != IGNORE_INDEX)
            if bool(outside.any()):
                raise InputError(
                    f"`{self.label_key}` in `{name}` must be token ids of the vocabulary (0..{self.vocab_size - 1}) "
                    f"or {IGNORE_INDEX}. Got {int(targets[outside][0])} in {_first(outside.any(dim=1), offset)}."
                )
        nothing = ~(targets != IGNORE_INDEX).any(dim=1)
        if bool(nothing.any()):
            raise InputError(
                f"{_first(nothing, offset)} of `{name}` has no token to predict: a causal LM predicts tokens 2..T from "
                "the "
                f"ones before, so a sequence needs two real tokens with a target (labels other than {IGNORE_INDEX}) "
                "after the first. Remove it or join it to its neighbours."
            )

    def with_labels(self, batch: Batch, labels: torch.Tensor) -> Any:
        first = torch.full_like(labels[:, :1], IGNORE_INDEX)
        return {**batch, self.label_key: torch.cat([first, labels[:, :-1].to(batch["input_ids"].dtype)], dim=1)}


def per_token(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One tokenised example of a :class:`CausalLMTask` (dict of 1-D tensors) as a batch of its target tokens:
    row j keeps only the j-th target token's label (the others ``-100``). ``inf.scores(per_token(x))`` then gives
    per-token influence, whose rows sum to the influence on the whole sequence (``reduction="sum"``)."""
    ids = torch.as_tensor(example["input_ids"])
    if ids.dim() != 1:
        raise InputError(f"per_token takes one example: `input_ids` of shape (T,). Got {tuple(ids.shape)}.")
    labels = torch.as_tensor(example["labels"]) if "labels" in example else ids.clone()
    if "labels" not in example and "attention_mask" in example:
        labels = torch.where(
            torch.as_tensor(example["attention_mask"]).bool(), labels, torch.full_like(labels, IGNORE_INDEX)
        )
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


def cache_prefix(
    task: HFTask,
    data: DataSource,
    *,
    batch_size: int = 16,
    folder: str | os.PathLike | None = None,
    progress: bool = False,
) -> PrefixCache:
    """``data`` with the outputs of the model's frozen prefix attached (:class:`~influencekit.hf.prefix.PrefixCache`):
    pass it in place of ``data`` to :class:`~influencekit.Influence`, ``scores``, ``fit_lbfgs``, and the task's
    forward runs only the part downstream of ``task``'s selected parameters. ``folder=``: keep the outputs on disk
    there (resumable, checked, memory-mapped when read) instead of in memory."""
    return PrefixCache(task, data, batch_size=batch_size, folder=folder, progress=progress)
