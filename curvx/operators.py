"""Hessian operators: exact Hessian-vector products of a model's mean loss.

A :class:`HessianOperator` is built once per model, loss and data set and applied
many times. It knows models and data and nothing about eigenvalues: the solver in
:mod:`curvx.lanczos` only sees its ``matmat``.

Shapes are written ``[n, k]``: ``n`` is the number of trainable parameters (in the
order of ``model.named_parameters()``, flattened and concatenated) and ``k`` the
number of vectors in a block.

The loss is the mean over every example of ``data``::

    L(w) = sum_c (n_c / N) * loss_fn(model(X_c; w), y_c)

where ``loss_fn`` returns the mean over the ``n_c`` examples of chunk ``c`` and
``N = sum_c n_c``. Every example counts once; a shorter last chunk is weighted by
its size.

BatchNorm and dropout policy (``mode``):

* ``"eval"`` (default): every Hessian-vector product runs the model in eval mode.
  BatchNorm uses its running statistics and dropout is off, so the operator is a
  fixed symmetric matrix that does not depend on how the data is chunked.
* ``"train"``: the model runs in train mode. BatchNorm normalizes each chunk with
  that chunk's statistics (the Hessian then depends on ``chunk_size``; full-batch
  chunks give the Hessian of the full-batch training loss) and dropout draws one
  fixed mask per chunk for the life of the operator (``dropout_seed``), so every
  product inside one solve sees the same function.

In both modes the model's own mode flags, its buffers (BatchNorm running
statistics), the parameters' ``.grad`` and the global RNG state are left as they
were.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvx import _ops
from curvx._validate import as_int
from curvx._warnings import CurvxWarning

__all__ = [
    "HessianOperator",
    "NonFiniteError",
    "ParametersChangedError",
    "hvp",
    "METHODS",
]

logger = logging.getLogger(__name__)

#: HVP paths: ``kept-graph`` (reverse-over-reverse on a first-backward graph kept
#: while the parameters do not change), ``rev-rev`` (plain double backward,
#: recomputed per product), ``fwd-rev`` (forward-over-reverse: a vmap over the jvp
#: of the gradient), ``finite-difference`` (central differences of gradients; an
#: approximation, used only as the last fallback).
METHODS = ("auto", "kept-graph", "rev-rev", "fwd-rev", "finite-difference")

_MODES = ("eval", "train")

#: Largest relative asymmetry of a probe product accepted per parameter dtype.
_SYMMETRY_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}

#: Default cap on the memory the kept graph may hold (bytes, all chunks together).
DEFAULT_GRAPH_MEMORY = 4 * 2**30


class NonFiniteError(FloatingPointError):
    """Raised when the loss, the gradient or a Hessian-vector product is not finite."""


class ParametersChangedError(RuntimeError):
    """Raised when an operator is used after the model's trainable parameters were
    replaced, (un)frozen or converted to another dtype or device."""


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={list(x.shape)}, dtype={x.dtype}, device={x.device})"
    return type(x).__name__


def _as_inputs(X: Any) -> tuple[Tensor, ...]:
    """Model inputs of one chunk as a tuple (``model(*inputs)``)."""
    if isinstance(X, Tensor):
        return (X,)
    if isinstance(X, (tuple, list)) and X and all(isinstance(t, Tensor) for t in X):
        return tuple(X)
    raise TypeError(
        "each batch's inputs X must be a tensor or a tuple of tensors; got "
        f"{_describe(X)}"
    )


def _make_chunks(
    data: Any, chunk_size: int | None
) -> list[tuple[tuple[Tensor, ...], Any, int]]:
    """Split ``data`` into ``(inputs, target, n_c)`` chunks.

    ``data`` is an ``(X, y)`` pair of tensors (split along dim 0 into chunks of
    ``chunk_size``; one chunk when it is None) or an iterable of ``(X, y)`` batches
    (a one-shot iterator is read once and kept).
    """
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size")
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and (
            isinstance(data[0], Tensor)
            or (
                isinstance(data[0], (tuple, list))
                and data[0]
                and all(isinstance(t, Tensor) for t in data[0])
            )
        )
    ):
        inputs, y = _as_inputs(data[0]), data[1]
        if any(t.dim() == 0 for t in inputs) or y.dim() == 0:
            raise ValueError(
                "data=(X, y) needs X and y with a leading example dimension; got "
                f"X {[_describe(t) for t in inputs]}, y {_describe(y)}"
            )
        N = y.shape[0]
        for t in inputs:
            if t.shape[0] != N:
                raise ValueError(
                    "data=(X, y) disagree on the number of examples: X has "
                    f"{t.shape[0]}, y has {N}"
                )
        if N == 0:
            raise ValueError("data=(X, y) holds no examples")
        size = N if chunk_size is None else chunk_size
        return [
            (tuple(t[i : i + size] for t in inputs), y[i : i + size], min(size, N - i))
            for i in range(0, N, size)
        ]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an (X, y) pair of tensors or an iterable of (X, y) batches; "
            f"got {_describe(data)}"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2:
        # A pair that failed the test above: name the half that is wrong (an
        # iterable of two batches never holds a bare tensor)
        if isinstance(data[0], Tensor):
            raise TypeError(
                "data=(X, y) needs y as a tensor of targets, to split with X; got y "
                f"{_describe(data[1])} (a target of another kind goes in a list of "
                "batches: data=[(X, y)])"
            )
        if isinstance(data[1], Tensor):
            _as_inputs(data[0])  # raises, naming what X is
    chunks = []
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"batch {i} of data must be an (X, y) pair; got {_describe(batch)}"
            )
        inputs = _as_inputs(batch[0])
        n_c = inputs[0].shape[0] if inputs[0].dim() > 0 else 0
        if n_c == 0:
            raise ValueError(f"batch {i} of data holds no examples")
        sizes = [t.shape[0] if t.dim() > 0 else 0 for t in inputs]
        if isinstance(batch[1], Tensor):
            sizes.append(batch[1].shape[0] if batch[1].dim() > 0 else 0)
        if len(set(sizes)) > 1:
            raise ValueError(
                f"batch {i} of data disagrees on the number of examples: X and y "
                f"have leading sizes {sizes}"
            )
        chunks.append((inputs, batch[1], n_c))
    if not chunks:
        raise ValueError("data is an empty iterable: no batches to build the loss from")
    return chunks


class HessianOperator:
    """The Hessian of a model's mean loss over a data set, as a linear operator.

    Args:
        model: the network; its parameters with ``requires_grad`` are the
            variables, in ``named_parameters()`` order.
        loss_fn: ``loss_fn(output, target) -> scalar``, the mean over the examples
            of the batch it is given (the same function the optimizer minimizes).
        data: an ``(X, y)`` pair of tensors, or an iterable of ``(X, y)`` batches.
            ``X`` may be a tuple of tensors (``model(*X)``).
        chunk_size: examples per forward pass when ``data`` is an ``(X, y)`` pair
            (None: all at once).
        method: one of :data:`METHODS`. ``"auto"`` uses the kept graph when it
            fits in ``graph_memory`` bytes (measured with saved-tensor hooks while
            it is built) and forward-over-reverse otherwise, and falls back along
            kept-graph, rev-rev, fwd-rev, finite-difference when an op lacks
            double backward or forward-mode AD (with one :class:`CurvxWarning`
            when only finite differences are left). When building the kept graph
            takes longer than ``measure_seconds``, a probe block is timed on the
            kept graph and on forward-over-reverse and the faster path is used.
        mode: ``"eval"`` or ``"train"``: the BatchNorm/dropout policy (module
            docstring).
        graph_memory: cap in bytes for the kept graph under ``method="auto"``.
        dropout_seed: seed of the fixed dropout masks in ``mode="train"``.
        measure_seconds: see ``method``.
        autocast: run the model's forward (and so the products) under
            ``torch.autocast`` with this dtype (``torch.bfloat16`` or
            ``torch.float16``): mixed precision on purpose. Products come back in
            the parameters' dtype; the solver's basis, projected matrix and Ritz
            values stay float64, and the residual certificates are measured
            against the products as computed (:attr:`precision` says which part
            used what). None: the parameters' dtype throughout.

    Note:
        The kept graph is rebuilt whenever a parameter changes (tracked through
        tensor version counters), so the operator always describes the current
        parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        chunk_size: int | None = None,
        method: str = "auto",
        mode: str = "eval",
        graph_memory: int = DEFAULT_GRAPH_MEMORY,
        dropout_seed: int = 0,
        measure_seconds: float = 0.05,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {_describe(model)}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable; got {_describe(loss_fn)}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self._bind_parameters()
        self.chunks = _make_chunks(data, chunk_size)
        self.num_examples = sum(n_c for _, _, n_c in self.chunks)
        self._check_data_devices()
        self.mode = mode
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                "autocast must be None, torch.bfloat16 or torch.float16; got "
                f"{autocast!r}"
            )
        self.autocast = autocast
        self.requested_method = method
        self.method = None if method == "auto" else method
        self.graph_memory = graph_memory
        self.measure_seconds = measure_seconds
        self.timings: dict[str, float] = {}
        self.dropout_seed = dropout_seed
        self.hvp_count = 0
        self.graph_bytes: int | None = None
        self._graph: list[tuple[list[int], list[Tensor]]] | None = None
        self._leaves: list[Tensor] | None = None
        self._graph_key: tuple | None = None
        self._graph_loss: Tensor | None = None
        self._graph_grad: Tensor | None = None
        self._failures: list[str] = []

    def _bind_parameters(self) -> None:
        """Read the model's trainable parameters: the operator's variables."""
        named = [
            (name, p) for name, p in self.model.named_parameters() if p.requires_grad
        ]
        if not named:
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True); "
                "there is no Hessian to compute"
            )
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) > 1 or len(devices) > 1:
            raise NotImplementedError(
                "trainable parameters must share one dtype and one device; got "
                f"dtypes {sorted(map(str, dtypes))} on devices "
                f"{sorted(map(str, devices))}"
            )
        self.dtype = next(iter(dtypes))
        if not self.dtype.is_floating_point:
            raise TypeError(
                f"trainable parameters must be floating point; got {self.dtype}"
            )
        self.device = next(iter(devices))
        if self.device.type == "meta":
            raise ValueError(
                "model's parameters are on the meta device (shapes only, no values); "
                "materialize the model (e.g. model.to_empty(device=...) and load "
                "weights) first"
            )
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)

    def rebind(self) -> None:
        """Take the model's current trainable parameters as the variables again
        (after a parameter was replaced, frozen, unfrozen or converted); the
        data chunks are kept. ``n`` may change."""
        self._bind_parameters()
        self._check_data_devices()
        self.release()
        if self.requested_method == "auto":
            self.method = None

    # ------------------------------------------------------------------ layout

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Per-parameter tensors ``[*shape_i]`` (None for zero) -> ``[n]``."""
        parts = [
            torch.zeros(m, dtype=self.dtype, device=self.device)
            if t is None
            else t.reshape(-1)
            for t, m in zip(tensors, self.numels)
        ]
        return torch.cat(parts)

    def flatten_batched(
        self,
        tensors: Sequence[Tensor | None],
        k: int,
        *,
        out: Tensor | None = None,
        weight: float = 1.0,
    ) -> Tensor:
        """Per-parameter blocks ``[k, *shape_i]`` (None for zero) -> ``[n, k]``.

        One kernel launch over all parameters (:func:`curvx._ops.pack_block`). With
        ``out`` (``[n, k]``, rows of adjacent entries), adds ``weight`` times the
        blocks to it in place and returns it: a chunk's products accumulated with
        the chunk's weight (:func:`curvx._ops.pack_block_add_`).
        """
        if self.dtype in _ops.N_ROW_DTYPES:
            if out is not None:
                return _ops.pack_block_add_(out, tensors, self.numels, weight)
            return _ops.pack_block(
                tensors,
                self.numels,
                k,
                weight=weight,
                dtype=self.dtype,
                device=self.device,
            )
        # Other dtypes (float16): the ATen composite
        parts = [
            torch.zeros(m, k, dtype=self.dtype, device=self.device)
            if t is None
            else t.reshape(k, -1).T
            for t, m in zip(tensors, self.numels)
        ]
        block = torch.cat(parts, dim=0)
        if out is not None:
            return out.add_(block, alpha=weight)
        return block if weight == 1.0 else block * weight

    def unflatten_batched(self, V: Tensor) -> list[Tensor]:
        """``[n, k]`` -> per-parameter blocks ``[k, *shape_i]``.

        One kernel launch over all parameters (:func:`curvx._ops.unpack_block`): the
        blocks are contiguous views of one buffer.
        """
        if V.dtype in _ops.N_ROW_DTYPES:
            return _ops.unpack_block(V, self.shapes)
        k = V.shape[1]  # other dtypes (float16): the ATen composite
        return [
            part.T.reshape(k, *shape)
            for part, shape in zip(V.split(self.numels, dim=0), self.shapes)
        ]

    def parameter_vector(self) -> Tensor:
        """The current parameters flattened, ``[n]`` (a copy)."""
        return self.flatten([p.detach() for p in self.params]).clone()

    # ------------------------------------------------------------ state guard

    def _check_data_devices(self) -> None:
        for i, (inputs, target, _) in enumerate(self.chunks):
            tensors = list(inputs) + ([target] if isinstance(target, Tensor) else [])
            for t in tensors:
                if t.device != self.device:
                    raise ValueError(
                        f"data batch {i} is on {t.device} but the model's parameters "
                        f"are on {self.device}; move the data (or the model) first"
                    )
            for t in inputs:
                if t.is_floating_point() and t.dtype != self.dtype:
                    raise TypeError(
                        f"data batch {i} has inputs of dtype {t.dtype} but the "
                        f"model's parameters are {self.dtype}; convert one of them "
                        f"(e.g. X.to({self.dtype}))"
                    )

    @contextlib.contextmanager
    def _guard(self):
        """Set the policy's mode, restore modes afterwards; keep the RNG untouched."""
        modes = [(m, m.training) for m in self.model.modules()]
        want = self.mode == "train"
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            for m, _ in modes:
                m.training = want
            with torch.random.fork_rng(devices=devices, enabled=want):
                yield
        finally:
            for m, flag in modes:
                m.training = flag

    def _buffers(self) -> dict[str, Tensor]:
        """Buffers for functional_call: copies, so that no forward (BatchNorm in
        train mode, a module that counts its calls) changes the model's own."""
        return {k: v.clone() for k, v in self.model.named_buffers()}

    def _seed_chunk(self, c: int) -> None:
        if self.mode == "train":
            torch.manual_seed(self.dropout_seed * 1_000_003 + c)

    def _chunk_loss(self, params: dict[str, Tensor], c: int) -> Tensor:
        inputs, target, _ = self.chunks[c]
        self._seed_chunk(c)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
        ):
            out = functional_call(self.model, (params, self._buffers()), inputs)
            loss = self.loss_fn(out, target)
        if self.autocast is not None and isinstance(loss, Tensor):
            loss = loss.to(self.dtype)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar (0-dim) tensor, the mean loss over the "
                f"batch; got {_describe(loss)}"
            )
        return loss

    def _weight(self, c: int) -> float:
        return self.chunks[c][2] / self.num_examples

    def _state_key(self) -> tuple:
        """Changes whenever a data tensor or a model buffer (BatchNorm running
        statistics, say) is modified in place or replaced."""
        data = [
            t
            for inputs, target, _ in self.chunks
            for t in (*inputs, target)
            if isinstance(t, Tensor)
        ]
        buffers = [b for _, b in self.model.named_buffers()]
        return tuple((t._version, t.data_ptr()) for t in data + buffers)

    def check_parameters(self) -> None:
        """Raise when the model's trainable parameters are no longer the ones
        this operator was built on (a parameter replaced, frozen, unfrozen, or
        converted to another dtype or device)."""
        current = [p for p in self.model.parameters() if p.requires_grad]
        same = len(current) == len(self.params) and all(
            p is q and p.dtype == self.dtype and p.device == self.device
            for p, q in zip(current, self.params)
        )
        if not same:
            got = sorted({f"{p.dtype} on {p.device}" for p in current})
            raise ParametersChangedError(
                "the model's trainable parameters changed since this operator was "
                f"built (it has {len(self.params)} tensors, {self.dtype} on "
                f"{self.device}; the model now has {len(current)}, {got}): a "
                "parameter was replaced, (un)frozen or converted; build a new "
                "operator (a Tracker does so by itself)"
            )

    # ------------------------------------------------------- loss and gradient

    def loss_and_grad(self, keep: bool = True) -> tuple[Tensor, Tensor]:
        """Mean loss (0-dim) and its gradient ``[n]`` at the current parameters.

        Never touches ``.grad``. With the kept graph this is free (it is the
        graph's first backward), and ``keep=True`` builds that graph when the
        kept-graph path is in use, so the products that follow reuse this pass
        (the fused step). ``keep=False`` runs a plain backward (no graph kept)
        unless a current kept graph already holds the answer.
        """
        self.check_parameters()
        if not keep and self._graph is not None and self._graph_is_current():
            return self._graph_loss, self._graph_grad
        if keep and self.method in (None, "kept-graph"):
            try:
                self._ensure_graph()
            except Exception as err:  # noqa: BLE001 - fallback chain
                if self.method == "kept-graph":
                    raise
                self._fallback("kept-graph", err)
            else:
                return self._graph_loss, self._graph_grad
        leaves = [p.detach().requires_grad_() for p in self.params]
        pd = dict(zip(self.names, leaves))
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with self._guard(), torch.enable_grad():
            for c in range(len(self.chunks)):
                loss = self._chunk_loss(pd, c) * self._weight(c)
                g = torch.autograd.grad(loss, leaves, allow_unused=True)
                total = total + loss.detach()
                grad += self.flatten(g)
        return total, grad

    # ---------------------------------------------------------- kept graph

    def _graph_is_current(self) -> bool:
        """The kept graph describes the current parameters, buffers and data.

        Parameters are compared by value with the graph's leaves (copies taken at
        build time), which also sees writes through ``p.data`` that bypass
        version counters; data and buffers by version counter. One host sync.
        """
        if self._graph is None or self._state_key() != self._graph_key:
            return False
        with torch.no_grad():
            changed = torch.stack(
                [(p != leaf).any() for p, leaf in zip(self.params, self._leaves)]
            ).any()
        return not bool(changed)

    def _ensure_graph(self) -> None:
        if self._graph_is_current():
            return
        key = self._state_key()
        self._graph = None
        # Leaves are copies: writes through p.data must not reach the saved graph
        leaves = [p.detach().clone().requires_grad_() for p in self.params]
        pd = dict(zip(self.names, leaves))
        seen: dict[tuple, int] = {}

        def pack(t: Tensor) -> Tensor:
            with contextlib.suppress(Exception):
                st = t.untyped_storage()
                seen[(st.data_ptr(), t.device)] = st.nbytes()
            return t

        graph = []
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        # The saved-tensor hook that measures the graph returns each tensor as is,
        # which makes an output saved by its own node a reference cycle that
        # autograd cannot free: measure once, on the first build (that one graph
        # stays in memory), and build without hooks afterwards
        measure = self.graph_bytes is None
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            if measure
            else contextlib.nullcontext()
        )
        with self._guard(), torch.enable_grad(), hooks:
            for c in range(len(self.chunks)):
                loss, g, live = self._first_backward(pd, leaves, c)
                graph.append((live, [g[i] for i in live]))
                total = total + loss.detach()
                grad += self.flatten([None if gi is None else gi.detach() for gi in g])
                if (
                    self.requested_method == "auto"
                    and sum(seen.values()) > self.graph_memory
                ):
                    raise MemoryError(
                        f"kept graph needs more than graph_memory={self.graph_memory} "
                        "bytes"
                    )
        if measure:
            self.graph_bytes = sum(seen.values())
        self._graph, self._leaves, self._graph_key = graph, leaves, key
        self._graph_loss, self._graph_grad = total, grad

    def release(self) -> None:
        """Drop the kept graph (it is rebuilt on the next product)."""
        self._graph = self._leaves = self._graph_key = None
        self._graph_loss = self._graph_grad = None

    def _matmat_kept(self, V: Tensor) -> Tensor:
        self._ensure_graph()
        k = V.shape[1]
        blocks = self.unflatten_batched(V)
        acc: list[Tensor | None] = [None] * len(self.params)
        for live, gs in self._graph:
            self._second_backward(gs, live, self._leaves, blocks, acc)
        return self.flatten_batched(acc, k)

    def _first_backward(
        self, params: dict[str, Tensor], leaves: list[Tensor], c: int
    ) -> tuple[Tensor, tuple[Tensor | None, ...], list[int]]:
        """Chunk ``c``'s weighted loss and its gradient with a graph kept.

        Returns the loss, the per-parameter gradients (None where unused) and the
        indices of those that depend on the parameters (the ones with a second
        derivative).
        """
        loss = self._chunk_loss(params, c) * self._weight(c)
        g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        return loss, g, live

    def _second_backward(
        self,
        gs: list[Tensor],
        live: list[int],
        leaves: list[Tensor],
        blocks: list[Tensor],
        acc: list[Tensor | None],
    ) -> None:
        """``acc += d<g, V>/dw`` for one chunk: the batched second backward.

        ``gs`` are the chunk's gradients that depend on the parameters (indices
        ``live``); ``blocks`` the per-parameter ``[k, *shape]`` tangents. The k
        columns go through one vmap-ed backward; where an op has no batching rule,
        column by column.
        """
        if not live:
            return
        grad_outputs = [blocks[i] for i in live]
        k = grad_outputs[0].shape[0]
        # On the CPU the vmap-ed backward is slower than column by column, and a
        # single column needs no vmap
        # (measured on fc-tanh/FMNIST: 1.12x at k = 8, 1.43x at k = 16)
        outs = None
        if gs[0].device.type != "cpu" and k > 1:
            try:
                outs = torch.autograd.grad(
                    gs,
                    leaves,
                    grad_outputs=grad_outputs,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            except RuntimeError as err:
                text = str(err).lower()
                if "vmap" not in text and "batch" not in text:
                    raise
                logger.debug("batched second backward failed (%s); per column", err)
        if outs is None:
            cols = [
                torch.autograd.grad(
                    gs,
                    leaves,
                    grad_outputs=[g[j] for g in grad_outputs],
                    retain_graph=True,
                    allow_unused=True,
                )
                for j in range(k)
            ]
            outs = [None if col[0] is None else torch.stack(col) for col in zip(*cols)]
        for i, o in enumerate(outs):
            if o is not None:
                acc[i] = o if acc[i] is None else acc[i] + o

    # ------------------------------------------------------------- rev-rev

    def _matmat_revrev(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        blocks = self.unflatten_batched(V)
        acc: list[Tensor | None] = [None] * len(self.params)
        leaves = [p.detach().requires_grad_() for p in self.params]
        pd = dict(zip(self.names, leaves))
        with self._guard(), torch.enable_grad():
            for c in range(len(self.chunks)):
                _, g, live = self._first_backward(pd, leaves, c)
                self._second_backward([g[i] for i in live], live, leaves, blocks, acc)
        return self.flatten_batched(acc, k)

    # ------------------------------------------------------------- fwd-rev

    def _matmat_fwdrev(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        tangents = dict(zip(self.names, self.unflatten_batched(V)))
        primals = {name: p.detach() for name, p in zip(self.names, self.params)}
        out = None
        with self._guard():
            for c in range(len(self.chunks)):
                w = self._weight(c)

                def grad_fn(p, c=c, w=w):
                    return torch.func.grad(lambda q: self._chunk_loss(q, c) * w)(p)

                def hvp_one(t, grad_fn=grad_fn):
                    return torch.func.jvp(grad_fn, (primals,), (t,))[1]

                hv = torch.func.vmap(hvp_one, randomness="same")(tangents)
                block = self.flatten_batched([hv[name] for name in self.names], k)
                out = block if out is None else out + block
        return out

    # --------------------------------------------------- finite differences

    def _matmat_fd(self, V: Tensor) -> Tensor:
        theta = [p.detach() for p in self.params]
        scale = math.sqrt(torch.finfo(self.dtype).eps) * 10
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            vnorm = float(v.norm())
            if vnorm == 0.0:
                cols.append(torch.zeros_like(v))
                continue
            pnorm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in theta)))
            eps = scale * (1.0 + pnorm) / vnorm
            steps = v.split(self.numels)
            gs = []
            for sign in (1.0, -1.0):
                shifted = [
                    (t + sign * eps * s.reshape(t.shape)).requires_grad_()
                    for t, s in zip(theta, steps)
                ]
                pd = dict(zip(self.names, shifted))
                g = torch.zeros(self.n, dtype=self.dtype, device=self.device)
                with self._guard(), torch.enable_grad():
                    for c in range(len(self.chunks)):
                        loss = self._chunk_loss(pd, c) * self._weight(c)
                        gc = torch.autograd.grad(loss, shifted, allow_unused=True)
                        g += self.flatten(gc)
                gs.append(g)
            cols.append((gs[0] - gs[1]) / (2 * eps))
        return torch.stack(cols, dim=1)

    # ------------------------------------------------------------ dispatch

    _IMPLS = {
        "kept-graph": "_matmat_kept",
        "rev-rev": "_matmat_revrev",
        "fwd-rev": "_matmat_fwdrev",
        "finite-difference": "_matmat_fd",
    }
    _CHAIN = ("kept-graph", "rev-rev", "fwd-rev", "finite-difference")

    def _first_order_error(self) -> BaseException | None:
        """The error of a plain loss + gradient on the first chunk, if any.

        A failure there is the user's (a shape or dtype mismatch, a bad loss),
        not a missing higher-order derivative: it must not start the fallbacks.
        """
        leaves = [p.detach().requires_grad_() for p in self.params]
        try:
            with self._guard(), torch.enable_grad():
                loss = self._chunk_loss(dict(zip(self.names, leaves)), 0)
                torch.autograd.grad(loss, leaves, allow_unused=True)
        except Exception as err:  # noqa: BLE001 - reported to the caller
            return err
        return None

    def _fallback(self, failed: str, err: BaseException) -> None:
        """Move ``self.method`` past ``failed`` in the fallback chain."""
        if isinstance(err, (ValueError, TypeError, NonFiniteError)):
            raise err
        if not isinstance(err, MemoryError):
            first = self._first_order_error()
            if first is not None:
                raise RuntimeError(
                    "loss_fn(model(X), y) and its gradient fail on the first batch "
                    f"({type(first).__name__}: {first}); this is not a missing "
                    "higher-order derivative"
                ) from first
        nxt = self._CHAIN[self._CHAIN.index(failed) + 1]
        if isinstance(err, MemoryError) and failed == "kept-graph":
            nxt = "fwd-rev"  # a memory-light path
        reason = f"{failed}: {type(err).__name__}: {str(err).splitlines()[0]}"
        self._failures.append(reason)
        if nxt == "finite-difference":
            warnings.warn(
                "curvx: no exact Hessian-vector product works on this model ("
                + "; ".join(self._failures)
                + "); falling back to finite differences of gradients (an "
                "approximation: residuals are then measured against it)",
                CurvxWarning,
                stacklevel=3,
            )
        logger.debug("HVP method %s failed (%s); trying %s", failed, err, nxt)
        self.release()
        self.method = nxt if self.requested_method == "auto" else None
        if self.method is None:
            raise err

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for a block ``V`` of shape ``[n, k]``; returns ``[n, k]``.

        The product is computed in the parameters' dtype; the result has ``V``'s
        dtype. The ``k`` vectors share one forward (and backward) pass per chunk.

        Raises:
            ValueError: ``V`` has the wrong shape.
            NonFiniteError: the product is not finite.
        """
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a tensor of shape [n, k]; got {_describe(V)}")
        if V.dim() != 2 or V.shape[0] != self.n or V.shape[1] < 1:
            raise ValueError(
                f"V must have shape [n, k] with n = {self.n} (the number of trainable "
                f"parameters) and k >= 1; got shape {list(V.shape)}"
            )
        if not V.dtype.is_floating_point:
            raise TypeError(f"V must be floating point; got dtype {V.dtype}")
        if V.device.type == "meta":
            raise ValueError(f"V is on the meta device (no values); got {_describe(V)}")
        self.check_parameters()
        out_dtype = V.dtype
        Vc = V.to(device=self.device, dtype=self.dtype)
        while True:
            method = self.method
            if method is None:
                method = self._choose()
            try:
                HV = getattr(self, self._IMPLS[method])(Vc)
                break
            except Exception as err:  # noqa: BLE001 - fallback chain
                if self.requested_method != "auto" or method == "finite-difference":
                    raise
                self._fallback(method, err)
        self.hvp_count += V.shape[1]
        # One reduction sees any NaN/inf; the exact check only when it fires
        if not torch.isfinite(HV.sum()) and not torch.isfinite(HV).all():
            if not torch.isfinite(Vc).all():
                raise ValueError(
                    "V holds NaN or inf entries (after conversion to the parameters' "
                    f"dtype {self.dtype}); got {_describe(V)}"
                )
            raise NonFiniteError(
                "the Hessian-vector product is not finite (NaN or inf): check the "
                "loss at the current parameters"
            )
        return HV.to(out_dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a single vector ``v`` of shape ``[n]``."""
        if not isinstance(v, Tensor) or v.dim() != 1:
            raise ValueError(
                f"v must have shape [n] with n = {self.n}; got {_describe(v)}"
            )
        return self.matmat(v[:, None])[:, 0]

    def __call__(self, V: Tensor) -> Tensor:
        return self.matvec(V) if V.dim() == 1 else self.matmat(V)

    def _choose(self) -> str:
        """Pick the HVP path under ``method="auto"``.

        The kept graph, when it fits in ``graph_memory`` bytes. When building it
        took longer than ``measure_seconds`` (a model where the choice matters),
        one probe block is timed on the kept graph and forward-over-reverse, and
        the faster path is kept (:attr:`timings` has the figures).
        """
        try:
            t0 = time.perf_counter()
            self._ensure_graph()
            build = time.perf_counter() - t0
            logger.debug(
                "kept graph: %.1f MiB, built in %.3f s",
                (self.graph_bytes or 0) / 2**20,
                build,
            )
            self.method = "kept-graph"
        except MemoryError as err:
            self._fallback("kept-graph", err)
            self.method = "fwd-rev"
            return self.method
        except Exception as err:  # noqa: BLE001 - fallback chain
            self._fallback("kept-graph", err)
            return self.method
        if build > self.measure_seconds:
            self._measure()

        # Products a silently incomplete double backward gets wrong are not
        # symmetric (u^T H v != v^T H u): check the chosen path once
        while self.method != "finite-difference":
            try:
                asym = self._asymmetry(self.method)
            except Exception as err:  # noqa: BLE001 - fallback chain
                self._fallback(self.method, err)
                continue
            if asym <= _SYMMETRY_TOL.get(self.dtype, 5e-2):
                break
            self._fallback(
                self.method,
                RuntimeError(f"its products are not symmetric (asymmetry {asym:.2g})"),
            )
        return self.method

    def _asymmetry(self, method: str) -> float:
        """``|u^T H v - v^T H u|`` relative to ``||Hu|| ||v|| + ||Hv|| ||u||``."""
        gen = torch.Generator().manual_seed(1)
        P = torch.randn(self.n, 2, generator=gen, dtype=torch.float64)
        P = P.to(device=self.device, dtype=self.dtype)
        HP = getattr(self, self._IMPLS[method])(P).double()
        if not torch.isfinite(HP).all():
            raise NonFiniteError(
                "the Hessian-vector product is not finite (NaN or inf): check the "
                "loss at the current parameters"
            )
        P = P.double()
        M = P.T @ HP
        norms = HP.norm(dim=0) * P.flip(1).norm(dim=0)
        return float((M[0, 1] - M[1, 0]).abs() / norms.sum().clamp_min(1e-300))

    def _measure(self) -> None:
        """Time one probe block on each exact path; keep the faster."""
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(self.n, 2, generator=gen, dtype=torch.float64)
        probe = probe.to(device=self.device, dtype=self.dtype)
        paths = (("kept-graph", self._matmat_kept), ("fwd-rev", self._matmat_fwdrev))
        for name, impl in paths:
            try:
                impl(probe)  # warm-up (vmap and autograd caches)
                t0 = time.perf_counter()
                impl(probe)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings[name] = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001 - an unusable path is not chosen
                logger.debug("probe of %s failed: %s", name, err)
                self.timings[name] = math.inf
        if self.timings["fwd-rev"] < 0.8 * self.timings["kept-graph"]:
            self.method = "fwd-rev"
            self.release()
        logger.debug("HVP probe seconds: %s -> %s", self.timings, self.method)

    @property
    def policy(self) -> dict[str, Any]:
        """The BatchNorm/dropout policy and HVP path, for run metadata."""
        return {
            "mode": self.mode,
            "batchnorm": (
                "running statistics (eval mode)"
                if self.mode == "eval"
                else "per-chunk batch statistics (train mode); running stats untouched"
            ),
            "dropout": (
                "off (eval mode)"
                if self.mode == "eval"
                else f"fixed masks per chunk, seed {self.dropout_seed}"
            ),
            "hvp_method": self.method or self.requested_method,
            "hvp_probe_seconds": dict(self.timings),
            "num_examples": self.num_examples,
            "num_chunks": len(self.chunks),
            "num_parameters": self.n,
            "precision": self.precision,
        }

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the products are computed in (autocast's, else the
        parameters')."""
        return self.autocast or self.dtype

    @property
    def precision(self) -> dict[str, str]:
        """Which precision each part of a solve uses."""
        hvp = (
            f"autocast {str(self.autocast).removeprefix('torch.')} over "
            f"{str(self.dtype).removeprefix('torch.')} parameters"
            if self.autocast is not None
            else str(self.dtype).removeprefix("torch.")
        )
        return {
            "hvp": hvp,
            "basis": "float64",
            "projected_matrix": "float64",
            "ritz_values": "float64",
            "residuals": "float64 from the products as computed",
        }


def hvp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    V: Tensor,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    mode: str = "eval",
) -> Tensor:
    """Exact Hessian-vector products of the mean loss over all of ``data``.

    Args:
        model, loss_fn, data, chunk_size, method, mode: as for
            :class:`HessianOperator`.
        V: ``[n]`` or ``[n, k]``, in the flattened order of the model's trainable
            parameters.

    Returns:
        ``H V`` with ``V``'s shape and dtype.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(10, 3), torch.randn(10, 1)
        >>> HV = hvp(model, torch.nn.functional.mse_loss, (X, y), torch.eye(4))
        >>> HV.shape
        torch.Size([4, 4])
    """
    op = HessianOperator(
        model, loss_fn, data, chunk_size=chunk_size, method=method, mode=mode
    )
    if not isinstance(V, Tensor) or V.dim() not in (1, 2):
        raise ValueError(
            f"V must have shape [n] or [n, k] with n = {op.n}; got {_describe(V)}"
        )
    return op(V)
