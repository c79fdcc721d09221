"""Layer-tap per-example gradients (influencekit.core.layers) against vmap(grad), and the engine's choice between them.

Tolerances: float64 throughout; the two routes differ only in summation order, so rows agree to 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.core.autodiff import ParamLayout, per_example_grads
from influencekit.core.errors import UnsupportedError
from influencekit.core.layers import LayerGradients, choose_per_example
from influencekit.engine.gradients import GradientSource


def _compare(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, params=None) -> float:
    task = ik.ClassificationTask(model, params=params)
    theta = task.params()
    layout = ParamLayout.of(theta)
    G_taps, v_taps = LayerGradients(model, layout)(task.loss, theta, (X, y))
    G_vmap, v_vmap = per_example_grads(task.loss, theta, (X, y), layout)
    assert torch.allclose(v_taps, v_vmap, rtol=1e-13, atol=1e-13)
    return float(((G_taps - G_vmap).norm(dim=1) / G_vmap.norm(dim=1)).max())


def test_mlp_with_biases_matches_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 3)).double()
    X, y = torch.randn(20, 7, dtype=torch.float64), torch.randint(0, 3, (20,))
    assert _compare(model, X, y) < 1e-12


def test_convolutions_of_every_kind_match_vmap():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # zero padding, bias
        nn.ReLU(),
        nn.Conv2d(4, 3, (2, 3), stride=2, dilation=(1, 2), bias=False),  # no bias, stride, dilation
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding="same", padding_mode="reflect"),  # string padding, reflect
        nn.Flatten(),
        nn.LazyLinear(4),
    ).double()
    X = torch.randn(9, 2, 10, 11, dtype=torch.float64)
    model(X)  # materialise the lazy layer
    y = torch.randint(0, 4, (9,))
    assert _compare(model, X, y) < 1e-12


class _Sequence(nn.Module):
    """A Linear applied at every position of a (B, T, d) input, then pooled: T > 1 positions per example."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


def test_linear_over_positions_and_a_selected_subset():
    torch.manual_seed(2)
    model = _Sequence().double()
    X, y = torch.randn(11, 6, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    assert _compare(model, X, y) < 1e-12
    assert _compare(model, X, y, params=["proj.weight", "head.bias"]) < 1e-12


class _PenalisedTask(ik.ClassificationTask):
    """A loss that uses a parameter outside its layer: layer taps cannot see the penalty."""

    def loss(self, params, batch):
        return super().loss(params, batch) + 0.3 * (params["0.weight"] ** 2).sum()


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_auto_falls_back_to_vmap_when_the_loss_uses_a_parameter_outside_its_layer():
    model = _mlp()
    task = _PenalisedTask(model)
    theta = task.params()
    layout = ParamLayout.of(theta)
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    fn, method, reason = choose_per_example("auto", model, task.loss, theta, layout, batch)
    assert method == "vmap" and "outside its layer" in reason
    G, _ = fn(task.loss, theta, batch)
    G_ref, _ = per_example_grads(task.loss, theta, batch, layout)
    assert torch.equal(G, G_ref)
    with pytest.raises(UnsupportedError, match="differ from vmap"):
        choose_per_example("layers", model, task.loss, theta, layout, batch)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.a(torch.tanh(self.a(x))))))


def test_unsupported_layers_and_shared_layers_fall_back_to_vmap():
    torch.manual_seed(4)
    model = _Shared().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    for params, match in ((["out", "norm"], "other layers"), (["a", "out"], "more than once")):
        task = ik.ClassificationTask(model, params=params)
        theta = task.params()
        layout = ParamLayout.of(theta)
        _, method, reason = choose_per_example("auto", model, task.loss, theta, layout, batch)
        assert method == "vmap" and match in reason
        with pytest.raises(UnsupportedError, match=match):
            choose_per_example("layers", model, task.loss, theta, layout, batch)


def test_engine_scores_equal_with_either_gradient_method(digits_small):
    (X, y), (Xt, yt) = digits_small.train, digits_small.test
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    results = {}
    for method in ("layers", "vmap", "auto"):
        inf = ik.Influence(
            ik.ClassificationTask(model, l2=1e-2),
            (X[:150], y[:150]),
            solver="exact",
            damping=0.5,
            gradients=method,
            batch_size=64,
        )
        with pytest.warns(ik.StationarityWarning):
            inf.fit()
        results[method] = (inf.scores((Xt[:20], yt[:20])).values, inf.self_influence())
        assert inf.gradient_methods_ == {
            "train": "vmap" if method == "vmap" else "layers",
            "test": "vmap" if method == "vmap" else "layers",
        }
    for method in ("layers", "auto"):
        for a, b in zip(results[method], results["vmap"]):
            assert float((a - b).norm() / b.norm()) < 1e-12


def test_gradients_option_is_checked():
    with pytest.raises(ik.InputError, match="`gradients` must be one of"):
        ik.Influence(ik.ClassificationTask(_mlp()), torch.zeros(2, 4), gradients="fast")


class Conv1D(nn.Module):
    """The transformers (GPT-2) layer: y = x W + b with W stored (in, out); recognised by class name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class _Text(nn.Module):
    """Conv1d over a (B, C, L) signal, then a transformers Conv1D at every position, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=2, dilation=2, stride=1)
        self.conv2 = nn.Conv1d(5, 4, 2, stride=2, padding="valid", bias=False)
        self.mix = Conv1D(6, 4)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv(x))))  # (B, 4, L')
        return self.head(torch.tanh(self.mix(h.transpose(1, 2))).mean(dim=1))


def test_conv1d_and_transformers_conv1d_match_vmap():
    torch.manual_seed(6)
    model = _Text().double()
    X, y = torch.randn(7, 3, 12, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert _compare(model, X, y) < 1e-12
    assert _compare(model, X, y, params=["mix.weight", "conv2.weight"]) < 1e-12


class _Text2d(nn.Module):
    """_Text rebuilt from Conv2d (kernel (1, k) over (B, C, 1, L)) and nn.Linear (the transposed weight)."""

    def __init__(self, src: _Text) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, (1, 3), padding=(0, 2), dilation=(1, 2))
        self.conv2 = nn.Conv2d(5, 4, (1, 2), stride=(1, 2), bias=False)
        self.mix = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.conv.weight.copy_(src.conv.weight.unsqueeze(2)), self.conv.bias.copy_(src.conv.bias)
            self.conv2.weight.copy_(src.conv2.weight.unsqueeze(2))
            self.mix.weight.copy_(src.mix.weight.T), self.mix.bias.copy_(src.mix.bias)
            self.head.load_state_dict(src.head.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv(x.unsqueeze(2))))).squeeze(2)
        return self.head(torch.tanh(self.mix(h.transpose(1, 2))).mean(dim=1))


def test_kfac_on_conv1d_and_transformers_conv1d_equals_the_conv2d_linear_twin():
    """The same network written with Conv1d + Conv1D and with Conv2d + Linear (whose factors are tested against a
    dense reference in test_kfac.py): every Kronecker factor equal to 1e-12, and so are the solves."""
    torch.manual_seed(7)
    model = _Text().double()
    twin = _Text2d(model).double()
    X, y = torch.randn(40, 3, 12, dtype=torch.float64), torch.randint(0, 3, (40,))
    fitted = []
    for m in (model, twin):
        inf = ik.Influence(
            ik.ClassificationTask(m, l2=1e-2),
            (X, y),
            solver="ekfac",
            damping=0.1,
            solver_options={"fisher": "empirical", "probes": 0, "keep_factors": True},
        )
        with pytest.warns(ik.StationarityWarning):
            fitted.append(inf.fit())
    one, two = ({layer.name: layer for layer in f.solver_.layers_} for f in fitted)
    assert sorted(one) == sorted(two) == ["conv", "conv2", "head", "mix"]
    for name in one:
        for factor in ("A", "S", "eig"):
            a, b = getattr(one[name], factor), getattr(two[name], factor)
            assert float((a - b).norm() / b.norm()) < 1e-12, (name, factor)
    v = {k: torch.randn_like(t) for k, t in fitted[0].task.params().items()}
    v_twin = {
        **v,
        "conv.weight": v["conv.weight"].unsqueeze(2),
        "conv2.weight": v["conv2.weight"].unsqueeze(2),
        "mix.weight": v["mix.weight"].T,
    }
    x1 = fitted[0].unflatten(fitted[0].solver_.solve(fitted[0].layout_.flatten(v)).x)
    x2 = fitted[1].unflatten(fitted[1].solver_.solve(fitted[1].layout_.flatten(v_twin)).x)
    torch.testing.assert_close(x1["mix.weight"], x2["mix.weight"].T, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(x1["conv.weight"], x2["conv.weight"].squeeze(2), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(x1["conv2.weight"], x2["conv2.weight"].squeeze(2), rtol=1e-11, atol=1e-13)


class _Bag(nn.Module):
    """Token ids -> embeddings (with a padding index) -> mean -> Linear: a bag-of-embeddings classifier."""

    def __init__(self, **embedding) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0, **embedding)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(dim=1))


def test_embeddings_match_vmap_and_odd_embeddings_fall_back():
    torch.manual_seed(8)
    X = torch.randint(0, 11, (9, 6))
    X[0, :3] = 0  # padding tokens: no gradient for row 0
    X[1] = 5  # a token repeated: its row sums six contributions
    y = torch.randint(0, 3, (9,))
    model = _Bag().double()
    assert _compare(model, X, y) < 1e-12
    odd = _Bag(scale_grad_by_freq=True).double()  # batch-dependent gradient: not a per-example sum
    task = ik.ClassificationTask(odd)
    theta = task.params()
    _, method, reason = choose_per_example("auto", odd, task.loss, theta, ParamLayout.of(theta), (X, y))
    assert method == "vmap" and "emb.weight" in reason


def test_scores_from_layer_pieces_equal_whole_rows_and_never_build_rows(monkeypatch):
    """Scoring from layer taps draws each chunk's gradients a parameter at a time (GradientSource.parts: a Linear's
    weight and bias, an embedding as its looked-up rows) and never builds a whole row: the scores, top-k and the L2
    term equal the vmap route's whole rows to 1e-12 relative (float64; summation order only)."""
    torch.manual_seed(8)
    X = torch.randint(0, 11, (70, 6))
    X[0, :3] = 0  # padding: no embedding gradient there
    X[1] = 5  # one token six times: its row gathers six contributions
    y = torch.randint(0, 3, (70,))
    Xt, yt = torch.randint(0, 11, (9, 6)), torch.randint(0, 3, (9,))
    model = _Bag().double()
    results = {}
    for method in ("vmap", "layers"):
        inf = ik.Influence(
            ik.ClassificationTask(model, l2=1e-2),
            (X, y),
            solver="exact",
            damping=0.3,
            gradients=method,
            batch_size=16,
            stationarity_tol=None,
        ).fit()
        if method == "layers":  # from here on a whole row of the training side would fail the test
            monkeypatch.setattr(
                GradientSource, "stream", lambda *a, **k: pytest.fail("whole gradient rows were streamed")
            )
        top = inf.top_k((Xt, yt), k=4)
        results[method] = (inf.scores((Xt, yt)).values, top.harmful.values, top.helpful.values, top.harmful.indices)
        assert inf.gradient_methods_["train"] == method
    for a, b in zip(results["layers"][:3], results["vmap"][:3]):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-12
    assert torch.equal(results["layers"][3], results["vmap"][3])


def test_block_read_and_write_by_column_runs_equal_the_index_gather_and_scatter():
    """LayerBlock.read / write (slices of contiguous columns) against M[:, index] and M[:, index] = X, exactly, for
    every block shape: weight and bias, weight only, bias only, a transposed weight (transformers' Conv1D), a
    convolution, an embedding; on a row slice of a wider matrix and on a column-strided one (the gather path)."""
    from transformers.pytorch_utils import Conv1D

    from influencekit.core.layers import layer_blocks

    torch.manual_seed(7)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(11, 3),
            "both": nn.Linear(4, 5),
            "weight_only": nn.Linear(5, 2, bias=False),
            "bias_only": nn.Linear(2, 3),
            "conv1d": Conv1D(6, 3),
            "conv": nn.Conv2d(2, 3, 2),
        }
    ).double()
    theta = {k: v for k, v in model.named_parameters() if k != "bias_only.weight"}
    layout = ParamLayout.of(theta)
    blocks, leftover = layer_blocks(model, layout, embeddings=True)
    assert not leftover and len(blocks) == 6
    wide = torch.randn(9, layout.n, dtype=torch.float64)
    for M in (wide[2:7], wide.T.contiguous().T[2:7]):
        for block in blocks:
            assert torch.equal(block.read(M), M[:, block.index])
            X = torch.randn(5, *block.index.shape, dtype=torch.float64)
            expected = M.clone()
            expected[:, block.index] = X
            block.write(M, X)
            assert torch.equal(M, expected)
