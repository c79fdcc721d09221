"""Layer taps: the inputs and output gradients of dense and convolution layers, from one ordinary backward pass.

Layers: nn.Linear (any leading dimensions), nn.Conv1d and nn.Conv2d (groups = 1, any padding mode), and the
transformers-style ``Conv1D`` (a dense layer whose weight is stored (in, out), recognised by class name); for
per-example gradients (not K-FAC) also nn.Embedding, whose gradient Σ_t e_{x_t} g_tᵀ is the output gradients
added into the rows of the looked-up indices.

For a layer with pre-activation outputs s_t = W a_t + b at positions t (one for a dense input; the sequence
positions of a ``(B, T, in)`` input; the spatial output positions of a convolution, a_t being the unfolded
input patch) and g_t = ∂ℓ/∂s_t, the per-example gradients are

    ∇_W ℓ(z) = Σ_t g_t a_tᵀ,        ∇_b ℓ(z) = Σ_t g_t.

Forward hooks record each layer's input and output; one ``autograd.grad`` of Σ_z ℓ(z) with respect to the
outputs gives every example's g at once, because an example's loss depends on its own outputs only. This is
what :mod:`~influencekit.solvers.kfac` builds its Kronecker factors from, and what :class:`LayerGradients`
turns into per-example gradient rows: one batched forward and backward plus a batched outer product, instead
of ``vmap(grad)`` running the model once per example (on the 1M-parameter CNN of ``benchmarks/scale.py``,
about 3× faster on CPU; ``benchmarks/scale.py`` measures both).

Only contributions that flow through the tapped modules' forward are seen: a loss that also uses a parameter
directly (a penalty on the weights, a tied weight used outside its module) would be missed. The engine
therefore compares the result with ``vmap(grad)`` on a few examples before using it
(:meth:`influencekit.Influence.fit`), and falls back to ``vmap(grad)`` when they differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from ..data.examples import Batch, batch_size_of
from .autodiff import LossFn, ParamLayout, per_example_grads, per_example_loop
from .errors import InfluenceKitError, UnsupportedError
from .memory import Workspace

__all__ = [
    "SUPPORTED_LAYERS",
    "GRADIENT_METHODS",
    "LayerBlock",
    "layer_blocks",
    "tied_parameters",
    "LayerTaps",
    "LayerGradients",
    "DensePiece",
    "EmbeddingPiece",
    "GradientPiece",
    "choose_per_example",
]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_transposed_linear(module: nn.Module) -> bool:
    """The transformers-style ``Conv1D`` (GPT-2): y = x W + b with W of shape (in, out), a dense layer whose
    weight is stored transposed. Recognised by its class name and attributes (transformers is not a dependency)."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and getattr(module, "nf", None) == w.shape[1]
    )


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1
    return isinstance(module, nn.Linear) or _is_transposed_linear(module)


GRADIENT_METHODS = ("auto", "layers", "vmap", "loop")
PerExample = Callable[[LossFn, dict[str, torch.Tensor], Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerBlock:
    """One supported module holding selected parameters, and where they sit in the flat parameter vector."""

    name: str
    module: nn.Module
    weight: str | None  # the selected weight's parameter name, or None
    bias: str | None  # the selected bias's parameter name, or None
    index: torch.Tensor  # (out, k): flat positions of the block [W | b], row-major
    captured: list[torch.Tensor] = field(default_factory=list)  # input, output of the current forward pass

    @property
    def transposed(self) -> bool:
        """The weight is stored (in, out) (transformers' Conv1D)."""
        return _is_transposed_linear(self.module)

    @property
    def embedding(self) -> bool:
        """An nn.Embedding: its inputs are row indices (:meth:`indices`), its weight (V, d) is indexed (V, d)."""
        return isinstance(self.module, nn.Embedding)

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """An embedding's looked-up rows as ``(B, T)``."""
        return x.reshape(x.shape[0], -1)

    @property
    def has_weight(self) -> bool:
        return self.weight is not None

    def _column_runs(self, M: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
        """The block's coordinates of each row of ``M (B, n)`` as views of contiguous runs of its columns, each with
        the part of the ``(B, out, k)`` block it holds: the weight's (transposed for Conv1D), then the bias's."""
        B, (out, k) = M.shape[0], self.index.shape
        weight_start, bias_start = self._run_starts
        runs = []
        if self.has_weight:
            kin = k - self.has_bias
            flat = M[:, weight_start : weight_start + out * kin]
            runs.append(
                (flat.view(B, kin, out).transpose(1, 2) if self.transposed else flat.view(B, out, kin), slice(0, kin))
            )
        if self.has_bias:
            runs.append((M[:, bias_start : bias_start + out, None], slice(k - 1, k)))
        return runs

    @functools.cached_property
    def _run_starts(self) -> tuple[int, int]:
        """The first flat column of the weight's and of the bias's run (read from ``index`` once: on a GPU each read
        waits for the device)."""
        first = self.index[0].tolist()
        return first[0], first[-1]

    def read(self, M: torch.Tensor) -> torch.Tensor:
        """``M[:, index]``, the block of each row of ``M (B, n)`` as ``(B, out, k)``, by slices of the contiguous
        runs of columns it covers rather than a gather (a view where the block is one run)."""
        if M.stride(1) != 1:
            return M[:, self.index]
        runs = self._column_runs(M)
        return runs[0][0] if len(runs) == 1 else torch.cat([view for view, _ in runs], dim=2)

    def write(self, M: torch.Tensor, block: torch.Tensor) -> None:
        """``M[:, index] = block`` for a ``(B, out, k)`` block, by slices of contiguous columns (no scatter)."""
        if M.stride(1) != 1:
            M[:, self.index] = block.to(M.dtype)
            return
        for view, part in self._column_runs(M):
            view.copy_(block[:, :, part])

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def inputs(self, x: torch.Tensor, *, dtype: torch.dtype | None = None, append_one: bool = True) -> torch.Tensor:
        """Layer inputs as ``(B, T, k)``: rows a_t (patches for a convolution), with a 1 appended for the bias
        when the bias is selected and ``append_one``."""
        m = self.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
                padding: Any = 0
            else:
                padding = m.padding
            if isinstance(m, nn.Conv1d):  # a Conv2d of kernel (1, k) over (B, C, 1, L)
                a = F.unfold(
                    x.unsqueeze(2),
                    (1, m.kernel_size[0]),
                    dilation=(1, m.dilation[0]),
                    padding=(0, padding if isinstance(padding, int) else padding[0]),
                    stride=(1, m.stride[0]),
                )
            else:
                a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            a = a.transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if dtype is not None:
            a = a.to(dtype)
        parts = [a] if self.has_weight else []
        if self.has_bias and append_one:
            parts.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=2) if len(parts) > 1 else (parts[0] if parts else a[:, :, :0])

    def output_grads(
        self, g: torch.Tensor, *, dtype: torch.dtype | None = None, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Output gradients as ``(B, T, out)``. An embedding needs its input ``x``: the positions that look up
        ``padding_idx`` get no gradient (zeroed)."""
        if self.embedding:
            g = g.reshape(g.shape[0], -1, g.shape[-1])
            g = g if dtype is None else g.to(dtype)
            pad = self.module.padding_idx
            return g if pad is None else g.masked_fill((self.indices(x) == pad).unsqueeze(-1), 0.0)
        if isinstance(self.module, (nn.Conv1d, nn.Conv2d)):
            g = g.flatten(2).transpose(1, 2)
        else:
            g = g.reshape(g.shape[0], -1, g.shape[-1])
        return g if dtype is None else g.to(dtype)


def _plain_embedding(module: nn.Module) -> bool:
    """An nn.Embedding whose gradient is a per-example sum of rows: no max_norm (it renormalises the weight in
    the forward pass) and no scale_grad_by_freq (it scales by frequencies within the whole batch)."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq


def tied_parameters(model: nn.Module) -> set[str]:
    """The names (as ``named_parameters`` gives them) of parameters held by more than one module: tied weights, such
    as GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``. Their gradient sums the uses of every holder, which
    no single layer's taps see."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {canonical[key] for key, names in holders.items() if len(names) > 1 and key in canonical}


def layer_blocks(
    model: nn.Module, layout: ParamLayout, *, embeddings: bool = False
) -> tuple[list[LayerBlock], list[str]]:
    """The supported modules (nn.Linear, transformers' Conv1D; nn.Conv1d and nn.Conv2d with groups=1; with
    ``embeddings``, nn.Embedding without max_norm or scale_grad_by_freq) holding selected parameters, in model
    order, and the selected parameter names they leave over. A tied parameter (:func:`tied_parameters`) is left
    over: its gradient is not one layer's."""
    offsets = dict(zip(layout.names, torch.tensor((0, *layout.numels[:-1])).cumsum(0).tolist()))
    selected = set(layout.names) - tied_parameters(model)
    blocks: list[LayerBlock] = []
    covered: set[str] = set()
    for mname, module in model.named_modules():
        if embeddings and _plain_embedding(module):
            wname = f"{mname}.weight" if mname else "weight"
            if wname in selected:
                V = module.weight.shape[0]
                index = offsets[wname] + torch.arange(module.weight.numel()).reshape(V, -1)
                blocks.append(LayerBlock(mname, module, wname, None, index.to(layout.device)))
                covered.add(wname)
            continue
        if not _supported(module):
            continue  # left over (grouped convolutions included)
        prefix = f"{mname}." if mname else ""
        wname, bname = prefix + "weight", prefix + "bias"
        weight = wname if wname in selected else None
        bias = bname if bname in selected and module.bias is not None else None
        if weight is None and bias is None:
            continue
        transposed = _is_transposed_linear(module)
        out = module.weight.shape[1] if transposed else module.weight.shape[0]
        parts = []
        if weight is not None:
            kin = module.weight.numel() // out
            if transposed:  # W stored (in, out): the (o, i) entry sits at i·out + o
                parts.append(offsets[wname] + torch.arange(out * kin).reshape(kin, out).T)
            else:
                parts.append(offsets[wname] + torch.arange(out * kin).reshape(out, kin))
            covered.add(wname)
        if bias is not None:
            parts.append(offsets[bname] + torch.arange(out).reshape(out, 1))
            covered.add(bname)
        blocks.append(LayerBlock(mname, module, weight, bias, torch.cat(parts, dim=1).to(layout.device)))
    return blocks, [n for n in layout.names if n not in covered]


class LayerTaps:
    """Forward hooks on the blocks' modules, recording only inside :meth:`run`. Use as a context manager."""

    def __init__(self, blocks: list[LayerBlock]) -> None:
        self.blocks = blocks
        self._on = False
        self._batch = 0  # the examples of the batch in run(): an embedding looked up once for all of them is expanded
        self._handles: list[Any] = []

    def __enter__(self) -> LayerTaps:
        for block in self.blocks:
            self._handles.append(block.module.register_forward_hook(self._hook(block)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            block.captured.clear()

    def _hook(self, block: LayerBlock) -> Callable[..., torch.Tensor | None]:
        def fn(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self._on:
                return None
            if block.captured:
                raise UnsupportedError(
                    f"layer {block.name!r} is called more than once per forward pass (shared or recurrent use); "
                    "layer taps need one call per layer. Exclude its parameters with `params=`."
                )
            x = inputs[0]
            if block.embedding and x.shape[0] == 1 and self._batch > 1:
                # ids of shape (1, T) broadcast over the batch (BERT's and GPT-2's position ids): the output is
                # expanded to the batch, so that its gradient is per example (the sum over the batch otherwise)
                x, output = x.expand(self._batch, *x.shape[1:]), output.expand(self._batch, *output.shape[1:])
                block.captured.extend([x.detach(), output])
                return output
            block.captured.extend([x.detach(), output])
            return None

        return fn

    def run(
        self, fn: LossFn, params: dict[str, torch.Tensor], batch: Batch, scale: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """One forward and backward of Σ_z scale_z · fn(z): each block's raw input, the gradient of the sum with
        respect to its raw output, and the per-example values of ``fn`` (detached)."""
        losses, inputs, outs = self._forward(fn, params, batch)
        total = (losses if scale is None else scale.to(losses.dtype) * losses).sum()
        return inputs, self._backward(total, outs, retain=False), losses.detach()

    def run_each(
        self,
        forward: LossFn,
        losses_of: Callable[[torch.Tensor], list[torch.Tensor]],
        params: dict[str, torch.Tensor],
        batch: Batch,
    ) -> tuple[list[torch.Tensor], Iterator[list[torch.Tensor]]]:
        """One forward of ``forward`` (per-example outputs) and one backward per loss vector of ``losses_of(outputs)``
        (e.g. the loss at each label of an expectation): ``(raw inputs, per loss the gradients of its sum with respect
        to
        each block's raw output)``, each backward run as its item is drawn (the graph is kept until the last)."""
        out, inputs, outs = self._forward(forward, params, batch)
        with torch.enable_grad():
            losses = losses_of(out)

        def backward_each() -> Iterator[list[torch.Tensor]]:
            for j, loss in enumerate(losses):
                yield self._backward(loss.sum(), outs, retain=j < len(losses) - 1)

        return inputs, backward_each()

    def _forward(
        self, fn: LossFn, params: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``fn`` on live aliases of ``params`` (new leaves on the same memory: a copy would add the selected
        parameters' size to every chunk, 342 MB on BERT-base) with the taps recording: its value, each block's raw
        input and raw output (the blocks keep no reference to them afterwards)."""
        live = {k: t.detach().requires_grad_(True) for k, t in params.items()}
        for block in self.blocks:
            block.captured.clear()
        self._batch = batch_size_of(batch)
        self._on = True
        try:
            with torch.enable_grad():
                value = fn(live, batch)
        finally:
            self._on = False
        missing = [block.name for block in self.blocks if not block.captured]
        if missing:
            raise UnsupportedError(
                f"the layers {missing} hold selected parameters but are not called by the model's forward "
                "pass; exclude them with `params=`."
            )
        inputs, outs = [block.captured[0] for block in self.blocks], [block.captured[1] for block in self.blocks]
        for block in self.blocks:
            block.captured.clear()
        return value, inputs, outs

    def _backward(self, total: torch.Tensor, outs: list[torch.Tensor], *, retain: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(total, outs, allow_unused=True, retain_graph=retain) if outs else ()
        return [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]


@dataclass(frozen=True)
class DensePiece:
    """Coordinates ``offset .. offset + numel`` of a chunk's per-example gradients, held as ``rows (B, numel)``."""

    offset: int
    rows: torch.Tensor

    def write(self, G: torch.Tensor) -> None:
        G[:, self.offset : self.offset + self.rows.shape[1]] = self.rows

    def dot(self, Q: torch.Tensor, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """⟨q, g⟩ on these coordinates for every row q of ``Q (q, n_params)`` and every example: ``(q, B)``, as
        ``product(Q's columns, rows)`` (a view of Q's columns, no copy)."""
        return product(Q[:, self.offset : self.offset + self.rows.shape[1]], self.rows)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.rows).all())


@dataclass(frozen=True)
class EmbeddingPiece:
    """An embedding weight's per-example gradients Σ_t e_{x_t} g_tᵀ, kept as the looked-up rows ``ids (B, T)`` and the
    output gradients ``grads (B, T, dim)`` (zero at padding): a ``(vocab, dim)`` dense row per example is avoided."""

    offset: int
    vocab: int
    ids: torch.Tensor
    grads: torch.Tensor

    def write(self, G: torch.Tensor) -> None:
        B, dim = self.grads.shape[0], self.grads.shape[2]
        rows = G[:, self.offset : self.offset + self.vocab * dim].view(B, self.vocab, dim)
        rows.zero_()
        rows.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, dim), self.grads)

    def dot(self, Q: torch.Tensor, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """⟨q, g⟩ on the embedding's coordinates: Σ_t q[x_t] · g_t, from the gathered rows of Q (one example at a
        time)."""
        dim = self.grads.shape[2]
        table = Q[:, self.offset : self.offset + self.vocab * dim].view(len(Q), self.vocab, dim)
        out = torch.empty(len(Q), len(self.ids), dtype=Q.dtype, device=Q.device)
        for b in range(len(self.ids)):
            out[:, b] = product(table[:, self.ids[b]].reshape(len(Q), -1), self.grads[b].reshape(1, -1))[:, 0]
        return out

    def finite(self) -> bool:
        return bool(torch.isfinite(self.grads).all())


GradientPiece = DensePiece | EmbeddingPiece


class LayerGradients:
    """Per-example gradients ``(B, n_params)`` of parameters that all belong to supported layers (Linear, Conv1d,
    Conv2d, Conv1D),
    from layer taps: ∇_W ℓ = Σ_t g_t a_tᵀ and ∇_b ℓ = Σ_t g_t per example (see the module docstring).

    Raises :class:`UnsupportedError` at construction when a selected parameter belongs to another layer.
    Calling it returns ``(grads, values)`` like :func:`~influencekit.core.autodiff.per_example_grads`; :meth:`pieces`
    gives
    the same gradients a parameter at a time (a consumer that scores them layer by layer never holds a whole row).
    """

    def __init__(self, model: nn.Module, layout: ParamLayout) -> None:
        blocks, leftover = layer_blocks(model, layout, embeddings=True)
        if leftover:
            raise UnsupportedError(
                f"layer taps cover nn.Linear, nn.Conv1d, nn.Conv2d (groups=1), nn.Embedding (no max_norm, no "
                f"scale_grad_by_freq) and transformers Conv1D only; the selected parameters "
                f"{', '.join(repr(n) for n in leftover[:5])}{' ...' if len(leftover) > 5 else ''} belong to other "
                "layers."
            )
        self.blocks = blocks
        self.layout = layout
        self._offsets = dict(zip(layout.names, torch.tensor((0, *layout.numels[:-1])).cumsum(0).tolist()))

    def __call__(self, fn: LossFn, params: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pieces, values = self.pieces(fn, params, batch)
        G = torch.empty(values.shape[0], self.layout.n, dtype=self.layout.dtype, device=self.layout.device)
        for piece in pieces:
            piece.write(G)
        return G, values

    def pieces(
        self, fn: LossFn, params: dict[str, torch.Tensor], batch: Batch, workspace: Workspace | None = None
    ) -> tuple[Iterator[GradientPiece], torch.Tensor]:
        """One tapped forward and backward: ``(pieces, values)``, the pieces made one at a time as they are drawn
        (together they cover every selected parameter once). With a ``workspace``, a weight's rows are made in its
        buffer ``"rows"``: each piece is then valid only until the next one is drawn."""
        with LayerTaps(self.blocks) as taps:
            inputs, grads, values = taps.run(fn, params, batch)
        return self._pieces(inputs, grads, workspace), values

    def _pieces(
        self, inputs: list[torch.Tensor], grads: list[torch.Tensor], workspace: Workspace | None
    ) -> Iterator[GradientPiece]:
        dtype = self.layout.dtype
        for block, x, g in zip(self.blocks, inputs, grads):
            if block.embedding:
                go = block.output_grads(g, dtype=dtype, x=x)
                yield EmbeddingPiece(self._offsets[block.weight], block.module.weight.shape[0], block.indices(x), go)
                continue
            go = block.output_grads(g, dtype=dtype)  # (B, T, out)
            if block.weight is not None:
                a = block.inputs(x, dtype=dtype, append_one=False)  # (B, T, in)
                left, right = (a, go) if block.transposed else (go, a)  # the weight's row-major (rows, cols)
                if go.shape[1] == 1:  # one position: an outer product, no reduction
                    rows = left[:, 0, :, None] * right[:, 0, None, :]
                elif workspace is None:
                    rows = torch.bmm(left.transpose(1, 2), right)
                else:
                    shape = (left.shape[0], left.shape[2], right.shape[2])
                    rows = workspace.take("rows", shape, dtype=right.dtype, device=right.device)
                    torch.bmm(left.transpose(1, 2), right, out=rows)
                yield DensePiece(self._offsets[block.weight], rows.reshape(rows.shape[0], -1))
            if block.bias is not None:
                yield DensePiece(self._offsets[block.bias], go.sum(dim=1))


def choose_per_example(
    mode: str,
    model: nn.Module,
    fn: LossFn,
    params: dict[str, torch.Tensor],
    layout: ParamLayout,
    batch: Batch,
    *,
    side: str = "train",
    check_examples: int = 4,
) -> tuple[PerExample, str, str]:
    """Pick how per-example gradients of ``fn`` are computed: ``(function, "layers" | "vmap" | "loop", reason)``.

    ``mode="vmap"``: ``vmap(grad)``. ``mode="loop"``: a plain autograd loop, one backward per example
    (:func:`~influencekit.core.autodiff.per_example_loop`). ``mode="layers"``: :class:`LayerGradients`, or
    :class:`UnsupportedError` when the selected parameters are not all in supported layers or the taps disagree
    with the reference. ``"auto"``, in this order: layer taps when they apply and agree with the reference on the
    first ``check_examples`` examples of ``batch`` to √eps relative per row; else ``vmap(grad)``; else the loop.
    The reference is ``vmap(grad)``, or the loop when ``vmap`` cannot trace the model (data-dependent control
    flow, e.g. the attention-mask code of transformers), so a model vmap cannot trace still gets layer taps.
    """

    def vmapped(f: LossFn, p: dict[str, torch.Tensor], b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return per_example_grads(f, p, b, layout)

    def looped(f: LossFn, p: dict[str, torch.Tensor], b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return per_example_loop(f, p, b, layout)

    if mode == "vmap":
        return vmapped, "vmap", "gradients='vmap'"
    if mode == "loop":
        return looped, "loop", "gradients='loop'"
    m = min(check_examples, batch_size_of(batch))
    # checked one example at a time: two gradient rows in memory, not three (m, p) blocks (on a BERT-base-size
    # model, 85.6M parameters, the blocks of 4 examples held 4 GB more than the scoring itself)
    examples = [tree_map(lambda t, i=i: t[i : i + 1] if isinstance(t, torch.Tensor) else t, batch) for i in range(m)]
    taps, taps_error, rows = None, None, {}
    try:
        taps = LayerGradients(model, layout)
        rows["taps"] = taps(fn, params, examples[0])[0][0]
    except UnsupportedError as exc:
        if mode == "layers":
            raise
        taps, taps_error = None, exc
    reference, ref_fn, ref_method, vmap_note = "vmap(grad)", vmapped, "vmap", ""
    try:
        rows["ref"] = per_example_grads(fn, params, examples[0], layout)[0][0]
    except InfluenceKitError:
        raise
    except Exception as exc:  # vmap could not trace the model: the autograd loop is the reference and the fallback
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        vmap_note = f"; vmap(grad) failed ({type(exc).__name__}: {first_line})"
        reference, ref_fn, ref_method = "a per-example autograd loop", looped, "loop"
        rows["ref"] = per_example_loop(fn, params, examples[0], layout)[0][0]
    if taps is None:
        return ref_fn, ref_method, f"{taps_error}{vmap_note}"
    tiny = torch.finfo(layout.dtype).tiny
    err = 0.0
    for i, one in enumerate(examples):
        g_taps = rows.pop("taps") if i == 0 else taps(fn, params, one)[0][0]
        g_ref = rows.pop("ref") if i == 0 else ref_fn(fn, params, one)[0][0]
        err = max(err, float((g_taps - g_ref).norm() / g_ref.norm().clamp_min(tiny)))
        del g_taps, g_ref
    tol = torch.finfo(layout.dtype).eps ** 0.5
    if err <= tol:
        return taps, "layers", f"layer taps agree with {reference} to {err:.1e} on {m} examples{vmap_note}"
    if mode == "layers":
        raise UnsupportedError(
            f"gradients='layers': the layer-tap gradients of the {side} side differ from {reference} by {err:.2e} "
            f"(relative) on its first {m} examples, so the loss uses a selected parameter outside its layer "
            "layer (e.g. a penalty or a tied weight). Use gradients='vmap' or 'auto'."
        )
    return (
        ref_fn,
        ref_method,
        f"layer taps differ from {reference} by {err:.1e} (> {tol:.1e}): the loss uses a parameter outside its "
        f"layer{vmap_note}",
    )
