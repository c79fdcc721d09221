"""Hugging Face transformers as influencekit tasks (``ik.hf``): sequence and token classification, causal language
models, and the frozen-prefix cache (:func:`cache_prefix`).

May import: ``influencekit.core`` and ``influencekit.data``. Imported by the engine (the prefix cache's batches) and
everything above it.
"""

from .prefix import PrefixCache
from .tasks import (
    IGNORE_INDEX,
    CausalLMTask,
    HFTask,
    PooledClassifier,
    SequenceClassificationTask,
    TokenClassificationTask,
    cache_prefix,
    pad_collate,
    per_token,
)

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
