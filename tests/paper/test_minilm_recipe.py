"""The transformer benchmark's recipes (influencekit_paper.minilm): which parameters each fine-tunes, the
BERT-base-size model of the GPU case, and the folder override for a machine without the weights package."""

import pytest
import torch

from influencekit.core.errors import InputError
from influencekit_paper.minilm import BLOCKS, MODULES, Recipe, bert_base, minilm_folder

pytest.importorskip("transformers", reason="the recipes build Hugging Face models (.[hf])")


def test_trained_blocks_follow_the_model_depth():
    """The last `trained_blocks` of the model's own blocks are trained: 6 for MiniLM, 12 for BERT-base."""
    assert BLOCKS == {"pooled": 6, "stock": 6, "bert-base": 12}
    two = Recipe(model="bert-base", trained_blocks=2)
    assert [two.trainable(f"bert.encoder.layer.{i}.output.dense.weight") for i in (0, 9, 10, 11)] == [
        False,
        False,
        True,
        True,
    ]
    assert not two.trainable("bert.embeddings.word_embeddings.weight") and two.trainable("classifier.weight")
    whole = Recipe(model="bert-base", trained_blocks=12)
    assert whole.trainable("bert.encoder.layer.0.attention.self.query.weight")
    assert whole.trainable("bert.embeddings.word_embeddings.weight")
    with pytest.raises(InputError, match="trained_blocks"):
        Recipe(model="stock", trained_blocks=12)
    assert Recipe(model="bert-base").key() != Recipe(model="stock").key()


def test_the_bert_base_case_covers_every_linear_layer():
    """109,483,778 parameters with MiniLM's 30,522 tokens; the case's 74 modules are all its Linear layers
    (85,609,730 parameters)."""
    torch.manual_seed(0)
    model = bert_base(30522)
    assert sum(p.numel() for p in model.parameters()) == 109_483_778
    modules = dict(model.named_modules())
    linear = [name for name, m in modules.items() if isinstance(m, torch.nn.Linear)]
    assert sorted(MODULES["bert-base"]["all"]) == sorted(linear)
    assert sum(p.numel() for name in linear for p in modules[name].parameters()) == 85_609_730


def test_the_folder_override(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCEKIT_MINILM_FOLDER", str(tmp_path))
    assert minilm_folder() == tmp_path
    monkeypatch.setenv("INFLUENCEKIT_MINILM_FOLDER", str(tmp_path / "absent"))
    with pytest.raises(InputError, match="INFLUENCEKIT_MINILM_FOLDER"):
        minilm_folder()
