"""Stock Hugging Face architectures, whole, through EK-FAC with default options (tiny random configs, float64).

Each family's ``AutoModelFor...`` class — BERT, RoBERTa, DistilBERT (sequence classification), GPT-2 (tied ``lm_head``
= ``wte``) and Llama (RMSNorm, rotary positions; tied and untied embeddings) — with ``params`` left at its default
(every parameter): the solver leaves out the parameters of layers it does not factor (LayerNorm, RMSNorm, tied
embeddings) with one warning and says so in the metadata, factors the rest (the position embeddings too, whose ids
are one ``(1, T)`` row broadcast over the batch), and its influence is compared with the exact Gauss-Newton influence
over the same parameters, built here from per-example Jacobians of the logits:

    G = (1/n) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it + (λ + δ) I,   I(z, z_test) = −∇ℓ(z_test)ᵀ G⁻¹ ∇L(z).

The classifiers use ``fisher="expected"`` (no sampling noise: EK-FAC's only error is its Kronecker-factored
eigenbasis and its independence of layers); the language models draw labels (the default), 4 per position.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from problems import pearson, token_sequences

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need `transformers` (pip install -e '.[hf]')"
)

torch.set_num_threads(1)

VOCAB, N, DAMPING, L2 = 12, 24, 0.05, 1e-2
BRIEF = 10.0  # stationarity_tol: trained by Adam for a while, close to but not at a minimum


def sequences(n: int, seed: int, *, labels: bool) -> list[dict[str, torch.Tensor]]:
    """Tokenised examples of 3–7 tokens (ids 1..VOCAB-1); label 1 when low ids outnumber high ones."""
    return token_sequences(n, seed, VOCAB, labels=labels, lengths=(3, 8))


def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=24,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _roberta() -> nn.Module:  # position ids from the input ids, past the padding id
    return transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=24,
            num_labels=2,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _distilbert() -> nn.Module:
    return transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(
            vocab_size=VOCAB,
            dim=8,
            n_layers=1,
            n_heads=2,
            hidden_dim=16,
            max_position_embeddings=24,
            num_labels=2,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
        )
    )


def _gpt2() -> nn.Module:  # lm_head.weight is tied to transformer.wte.weight
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=8,
            n_layer=1,
            n_head=2,
            n_positions=24,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _llama(tied: bool) -> nn.Module:
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=24,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


# family: (model, causal LM?, the parameters left out by default, least Pearson r of EK-FAC against the exact
# Gauss-Newton influence, and against its layer blocks). Measured (torch 2.13, float64): BERT 0.940 / 0.997, RoBERTa
# 0.847 / 0.996, DistilBERT 0.787 / 0.998, GPT-2 0.462 / 0.709, Llama 0.333 / 0.826, Llama tied 0.318 / 0.746. The
# classifiers' layer blocks are reproduced (one position per loss, the expected Fisher); what is lost there is the
# curvature between layers. The language models lose more within a layer too: a loss at every position, whose
# Kronecker factors (the sum over positions of g gᵀ times the mean of a aᵀ) only approximate the layer's block.
FAMILIES = {
    "bert": (_bert, False, ("LayerNorm",), 0.9, 0.99),
    "roberta": (_roberta, False, ("LayerNorm",), 0.8, 0.99),
    "distilbert": (_distilbert, False, ("LayerNorm", "layer_norm"), 0.75, 0.99),
    "gpt2": (_gpt2, True, ("ln_", "wte"), 0.4, 0.65),
    # the tiny Llamas' r against the whole Gauss-Newton matrix moves with the sampled labels: 0.21-0.33 (untied) and
    # 0.27-0.34 (tied) over 5 label seeds (the identity: 0.23 and 0.06); the check of EK-FAC itself is the r against
    # the layer blocks it approximates (0.75 and more)
    "llama": (lambda: _llama(False), True, ("norm",), 0.2, 0.75),
    "llama-tied": (lambda: _llama(True), True, ("norm", "embed_tokens"), 0.2, 0.7),
}


def trained(family: str) -> tuple[nn.Module, ik.hf.HFTask, list, list]:
    build, causal, _, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build().double()
    make = ik.hf.CausalLMTask if causal else ik.hf.SequenceClassificationTask
    task = make(model, l2=L2)
    train, test = sequences(N, 1, labels=not causal), sequences(5, 2, labels=not causal)
    batch = ik.hf.pad_collate(train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        task.objective(dict(model.named_parameters()), batch).mean().backward()
        opt.step()
    return model.eval(), task, train, test


def gradient(task: ik.hf.HFTask, example: dict, *, l2: bool) -> torch.Tensor:
    """∇ℓ (or ∇L with the L2 term) of one example by plain autograd, over the task's selected parameters."""
    named = dict(task.model.named_parameters())
    params = [named[n] for n in task.param_names]
    loss = (task.objective if l2 else task.loss)(named, ik.hf.pad_collate([example])).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def gauss_newton(task: ik.hf.HFTask, train: list, shift: float) -> torch.Tensor:
    """(1/n) Σ_i Σ_t J_itᵀ (diag p − p pᵀ) J_it + shift·I over the task's selected parameters (see the module
    docstring)."""
    named = dict(task.model.named_parameters())
    params = [named[n] for n in task.param_names]
    P = sum(p.numel() for p in params)
    G = torch.zeros(P, P, dtype=torch.float64)
    for example in train:
        batch = ik.hf.pad_collate([example])
        logits = task.outputs(named, batch)[0]
        mask = task.label_mask(task.labels(batch))[0]
        rows = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1)]
        for row in rows:
            J = torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(row[c], params, retain_graph=True)])
                    for c in range(len(row))
                ]
            )
            p = torch.softmax(row.detach(), dim=0)
            G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G / len(train) + shift * torch.eye(P, dtype=torch.float64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_whole_stock_model_runs_through_ekfac_and_agrees_with_exact_gauss_newton(family):
    model, task, train, test = trained(family)
    _, causal, left_out, r_min, r_blocks_min = FAMILIES[family]
    options = {"samples": 4} if causal else {"fisher": "expected"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = ik.Influence(task, train, solver="ekfac", damping=DAMPING, solver_options=options, stationarity_tol=BRIEF)
    notices = [str(w.message) for w in caught if issubclass(w.category, ik.InfluenceKitWarning)]
    assert len(notices) == 1 and "left out" in notices[0], notices
    excluded = inf.task.excluded_params
    assert excluded and all(any(part in name for part in left_out) for name in excluded), excluded
    assert not any(any(part in name for part in left_out) for name in inf.task.param_names)
    assert task.excluded_params == ()  # the user's task is not changed
    scores = inf.fit().scores(test)
    assert scores.metadata["params_excluded"] == list(excluded)
    assert scores.metadata["params"] == list(inf.task.param_names)
    assert inf.gradient_methods_ == {"train": "layers", "test": "layers"}

    G = gauss_newton(inf.task, train, L2 + DAMPING)
    G_train = torch.stack([gradient(inf.task, ex, l2=True) for ex in train])
    G_test = torch.stack([gradient(inf.task, ex, l2=False) for ex in test])
    reference = -G_test @ torch.linalg.solve(G, G_train.T)
    blocks = torch.zeros_like(G)  # what EK-FAC approximates layer by layer: G without the blocks between layers
    for layer in inf.solver_.layers_:
        at = layer.index.reshape(-1)
        blocks[at[:, None], at[None, :]] = G[at[:, None], at[None, :]]
    r, r_blocks = (
        pearson(scores.values, reference),
        pearson(scores.values, -G_test @ torch.linalg.solve(blocks, G_train.T)),
    )
    r_identity = pearson(-G_test @ G_train.T, reference)  # no curvature at all, for comparison
    print(
        f"{family}: {inf.n_params} parameters factored, {len(excluded)} tensors left out; EK-FAC vs exact GN "
        f"r = {r:.4f} (identity {r_identity:.4f}), vs its layer blocks r = {r_blocks:.4f}"
    )
    assert r >= r_min and r_blocks >= r_blocks_min


def test_the_diagonal_option_keeps_every_parameter_of_a_whole_model():
    model, task, train, test = trained("bert")
    with pytest.warns(ik.InfluenceKitWarning, match="outside supported layers and get a damped diagonal"):
        inf = ik.Influence(
            task,
            train[:12],
            solver="ekfac",
            damping=DAMPING,
            solver_options={"unsupported": "diagonal"},
            stationarity_tol=BRIEF,
        ).fit()
    assert inf.task is task and inf.n_params == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(inf.scores(test[:2]).values).all()
    with pytest.raises(ik.UnsupportedError, match=r"LayerNorm.*belong to other layers.*params="):
        ik.Influence(task, train, solver="ekfac", solver_options={"unsupported": "error"}).fit()


def test_padding_leaves_whole_model_ekfac_scores_unchanged():
    """The issue's one-layer BERT: every example padded to 12 tokens, then to 20; the same scores to 1e-8."""
    model, task, train, test = trained("bert")

    def padded(data: list, length: int) -> list:
        out = []
        for ex in data:
            pad = length - len(ex["input_ids"])
            out.append(
                {
                    "input_ids": torch.cat([ex["input_ids"], torch.zeros(pad, dtype=torch.long)]),
                    "attention_mask": torch.cat([ex["attention_mask"], torch.zeros(pad, dtype=torch.long)]),
                    "labels": ex["labels"],
                }
            )
        return out

    values = []
    for length in (12, 20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ik.InfluenceKitWarning)
            inf = ik.Influence(
                task, padded(train, length), solver="ekfac", damping=DAMPING, stationarity_tol=BRIEF
            ).fit()
        values.append(inf.scores(padded(test, length)).values)
    assert (values[0] - values[1]).abs().max() <= 1e-8 * values[0].abs().max()


def test_a_tied_module_is_selected_by_its_own_name():
    model, task, train, _ = trained("gpt2")
    tied = ik.hf.CausalLMTask(model, params="lm_head")
    assert tied.param_names == ("transformer.wte.weight",)
    inf = ik.Influence(tied, train[:8], solver="cg", damping=DAMPING, stationarity_tol=BRIEF).fit()
    assert inf.n_params == VOCAB * 8
    with pytest.raises(ik.UnsupportedError, match=r"none of the selected parameters.*'transformer\.wte\.weight'"):
        ik.Influence(tied, train, solver="ekfac")


# ------------------------------------------------------------------------------------------- bad input
def _forward_counter(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _with_last(data: list, **changes) -> list:
    return data[:-1] + [{**data[-1], **changes}]


def _classifier_cases(data: list) -> dict[str, tuple[list, str]]:
    long = torch.randint(1, VOCAB, (30,))
    return {
        "a label outside the classes": (
            _with_last(data, labels=torch.tensor(5)),
            r"labels in `train` must be classes 0\.\.1 of the model's 2\. Got 5 in example 23",
        ),
        "an id outside the vocabulary": (
            _with_last(data, input_ids=torch.tensor([3, VOCAB + 4, 2])),
            rf"ids of the model's vocabulary \(0\.\.{VOCAB - 1}\)\. Got {VOCAB + 4} in example 23",
        ),
        "a negative id": (_with_last(data, input_ids=torch.tensor([3, -1, 2])), r"Got -1 in example 23; tokenise"),
        "a sequence longer than the positions": (
            _with_last(data, input_ids=long, attention_mask=torch.ones(30, dtype=torch.long)),
            r"a sequence of 30 tokens \(example 23\), more than the model's 24 positions.*max_length=24",
        ),
        "an empty attention mask": (
            _with_last(data, attention_mask=torch.zeros(len(data[-1]["input_ids"]), dtype=torch.long)),
            r"example 23 of `train` has an attention mask of zeros",
        ),
        "float ids": (
            [{**ex, "input_ids": ex["input_ids"].double()} for ex in data],
            r"`input_ids` in `train` must be integer token ids\. Got torch\.float64",
        ),
    }


@pytest.mark.parametrize("case", sorted(_classifier_cases(sequences(N, 1, labels=True))))
def test_bad_classifier_input_is_refused_before_the_model_runs(case):
    torch.manual_seed(0)
    model = _bert().double().eval()
    data, message = _classifier_cases(sequences(N, 1, labels=True))[case]
    calls = _forward_counter(model)
    inf = ik.Influence(ik.hf.SequenceClassificationTask(model), data, solver="cg", damping=DAMPING)
    with pytest.raises(ik.InputError, match=message):
        inf.fit()
    assert calls[0] == 0, f"{case}: the model ran {calls[0]} time(s) before the error"


def test_bad_language_model_input_is_refused_before_the_model_runs():
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    task = ik.hf.CausalLMTask(model)
    data = sequences(N, 3, labels=False)
    calls = _forward_counter(model)
    one_token = _with_last(data, input_ids=torch.tensor([4]), attention_mask=torch.tensor([1]))
    with pytest.raises(ik.InputError, match=r"example 23 of `train` has no token to predict.*two real tokens"):
        ik.Influence(task, one_token, solver="cg").fit()
    labelled = [{**ex, "labels": ex["input_ids"]} for ex in data]
    labels = _with_last(
        labelled,
        labels=torch.tensor([-100, 3, VOCAB]),
        input_ids=torch.tensor([1, 2, 3]),
        attention_mask=torch.ones(3, dtype=torch.long),
    )
    with pytest.raises(
        ik.InputError, match=rf"`labels` in `train` must be token ids of the vocabulary.*Got {VOCAB} in example 23"
    ):
        ik.Influence(task, labels, solver="cg").fit()
    assert calls[0] == 0
    with pytest.raises(ik.InputError, match="no token to predict"):  # the test side too, before its gradients
        ik.Influence(task, data, solver="cg", damping=DAMPING, stationarity_tol=BRIEF).fit().scores(one_token[-2:])


def test_examples_with_different_fields_are_refused_before_the_model_runs():
    """Labels on some examples only: the batch's first example decided which fields were kept (the labels dropped, or
    a KeyError from inside the collation); now an error names both field lists."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    data = sequences(N, 3, labels=False)
    data[-1] = {**data[-1], "labels": data[-1]["input_ids"]}
    calls = _forward_counter(model)
    with pytest.raises(
        ik.InputError,
        match=r"same fields\. Got \['attention_mask', 'input_ids'\] .* \['attention_mask', 'input_ids', 'labels'\]",
    ):
        ik.Influence(ik.hf.CausalLMTask(model), data, solver="cg").fit()
    assert calls[0] == 0


def test_the_correction_pass_reuses_the_first_pass_per_token_labels(monkeypatch):
    """EK-FAC on a causal LM draws one label per position in its factor pass and keeps them for the correction pass
    (one draw per fit, not two): the fitted eigenvalues equal, bit for bit, those of a fit that draws them again
    (the cache turned off), and the second pass draws nothing."""
    import influencekit.solvers.fisher as fisher

    model, task, train, _ = trained("gpt2")
    draws = []
    original = fisher.FisherPasses._draw_tokens

    def counted(self, out, lo, *rest):
        draws.append(lo)
        return original(self, out, lo, *rest)

    monkeypatch.setattr(fisher.FisherPasses, "_draw_tokens", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ik.InfluenceKitWarning)
        cached = ik.Influence(task, train, solver="ekfac", damping=DAMPING, stationarity_tol=None, batch_size=8).fit()
        n_chunks = len(draws)
        monkeypatch.setattr(fisher, "LABEL_CACHE_BYTES", 0)
        again = ik.Influence(task, train, solver="ekfac", damping=DAMPING, stationarity_tol=None, batch_size=8).fit()
    assert n_chunks == 3 and len(draws) == 3 + 6  # 24 sequences in chunks of 8: drawn once, then in both passes
    for a, b in zip(cached.solver_.layers_, again.solver_.layers_):
        torch.testing.assert_close(a.eig, b.eig, rtol=0, atol=0)
    assert not cached.solver_.passes._drawn  # the kept labels are dropped when the fit ends


def test_batches_of_similar_lengths_give_the_in_order_factors_and_scores(monkeypatch):
    """The factor passes and the training side of scoring take unpadded sequences in batches of similar lengths (less
    padding through the model): every example once, the longest batch first; the factors and eigenvalues equal those
    of a fit in data order (float64, 1e-10), with the expected Fisher and with sampled labels (drawn per example
    index, whatever the batch), and so do the scores and the top-k, each placed at its example's index."""
    from influencekit.data.examples import Examples, length_groups

    lengths = np.array([5, 3, 7, 7, 4, 6, 3])
    assert length_groups(lengths, 3) == [[2, 3, 5], [0, 1, 4], [6]]  # longest first, ties in index order
    assert length_groups(lengths, 2, start=2, stop=5) == [[2, 3], [4]]

    model, task, train, test = trained("bert")
    assert len(set(Examples(train).lengths().tolist())) > 1
    for fisher in ("expected", "sampled"):

        def fit():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ik.InfluenceKitWarning)
                options = {"fisher": fisher, "keep_factors": True}
                inf = ik.Influence(
                    task,
                    train,
                    solver="ekfac",
                    damping=DAMPING,
                    stationarity_tol=None,
                    batch_size=5,
                    solver_options=options,
                )
                inf.fit()
                return inf.solver_.layers_, inf.scores(test).values, inf.top_k(test, k=3)

        grouped, scores, top = fit()
        with monkeypatch.context() as m:
            m.setattr(Examples, "lengths", lambda self, field="input_ids": None)
            in_order, in_order_scores, in_order_top = fit()
        for a, b in zip(grouped, in_order):
            for name in ("A", "S", "eig"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(scores, in_order_scores, rtol=1e-10, atol=1e-14)
        for side in ("helpful", "harmful"):
            assert torch.equal(getattr(top, side).indices, getattr(in_order_top, side).indices)
            torch.testing.assert_close(
                getattr(top, side).values, getattr(in_order_top, side).values, rtol=1e-10, atol=1e-14
            )
