"""Inputs for every kernel-table op: shapes, value domains, and the three layouts.

Every op of :data:`bpgpu.kernels.OPS` (except ``matmul``, which is cuBLAS and not
a generated kernel) is described by its arguments, in the order of the shared
signature.  A :class:`Case` builds them for one dtype and one layout:

``random``     contiguous arrays;
``broadcast``  every read-only matrix / vector input is a stride-0 broadcast of
               one row (the bias row over a matrix is broadcast in every layout);
``strided``    every array, outputs included, is a non-contiguous view
               (every other column / element of a larger buffer);
``inplace``    contiguous, and ``out`` is the very array the op documents it may
               alias (z for the forward ops, s for the backward ops): the calls
               the network makes for hidden layers.  Only for ops with such an alias;
``extreme``    contiguous, with the values that break naive formulas: logits up to
               |z| ≈ 150 (e^z overflows float32 beyond 88) and outputs/targets
               exactly 0 and 1 (the clip in log a, 1/a).  float32 and float64 only,
               compared with the reference run in the same dtype (its clip bounds
               depend on the dtype).

Arguments the CUDA twins ignore (``scratch``, ``rows``) are fresh buffers for the
reference; everything else is compared after the call, inputs included (so an
op that must leave an input alone, or must update it in place, is checked too).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bpgpu.kernels import ACTIVATIONS, LOSSES, OPS

M, N, N_IN, P = 13, 7, 5, 97  # odd sizes: no kernel gets a power-of-two shortcut
LAYOUTS = ("random", "broadcast", "strided", "inplace", "extreme")
DTYPES = (np.float16, np.float32, np.float64)
# Ops whose CUDA twin calls a CuPy routine rather than a bpgpu kernel: nothing of ours to
# generate; on numpy arrays CuPy would just hand the call to numpy. The GPU tests cover them.
NOT_GENERATED = {
    "matmul": "cuBLAS GEMM through cupy.matmul",
    "take_rows": "CuPy's own gather (cupy.take)",
}


# --- value domains (inputs must be valid for the op: a = g(z) for g′, probabilities for losses)


def normal(rng, shape):
    return rng.standard_normal(shape)


def unit_open(rng, shape):
    return rng.uniform(0.05, 0.95, shape)


def tanh_out(rng, shape):
    return rng.uniform(-0.95, 0.95, shape)


def relu_out(rng, shape):
    return np.maximum(rng.standard_normal(shape), 0.0)


def softplus_out(rng, shape):
    return np.logaddexp(rng.standard_normal(shape), 0.0)


def exp_out(rng, shape):
    return np.exp(rng.standard_normal(shape))


def counts(rng, shape):
    return rng.poisson(2.0, shape).astype(float)  # Poisson targets, zeros included (0 log 0)


def softmax_rows(rng, shape):
    e = np.exp(rng.standard_normal(shape))
    return e / e.sum(axis=-1, keepdims=True)


def one_hot(rng, shape):
    t = np.zeros(shape)
    t[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = 1.0
    return t


def binary(rng, shape):
    return rng.integers(0, 2, shape).astype(float)


def positive(rng, shape):
    return rng.uniform(0.01, 1.0, shape)


def logits(rng, shape):
    return 2.0 * rng.standard_normal(shape)


def _saturated(rng, shape):
    return rng.choice([0.0, 1.0, 0.5, 1e-30], shape)


# "extreme" layout: the domain each ordinary domain is replaced by
EXTREME = {logits: lambda rng, shape: 50.0 * rng.standard_normal(shape), unit_open: _saturated, softmax_rows: one_hot}


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    shape: tuple  # a tuple of ints, or None for a Python scalar
    domain: object = normal  # a function (rng, shape) -> float64 values, or the scalar's value
    role: str = "in"  # "in" (read-only), "io" (updated in place), "out", "aux" (numpy-only buffer)
    alias: str = ""  # for an output: the argument it is in the "inplace" layout


def _act(g):
    a_dom = {
        "sigmoid": unit_open,
        "tanh": tanh_out,
        "relu": relu_out,
        "softplus": softplus_out,
        "softmax": softmax_rows,
        "exp": exp_out,
    }.get(g, normal)
    fwd = (
        Arg("z", (M, N), logits, "io"),
        Arg("b", (N,)),
        Arg("out", (M, N), role="out", alias="z"),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    )
    bwd = (
        Arg("s", (M, N)),
        Arg("a", (M, N), a_dom),
        Arg("out", (M, N), role="out", alias="s"),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    )
    return {f"{g}_fwd": fwd, f"{g}_bwd": bwd}


# (output a, target t) domains of each loss: a valid for the loss, t in its range
_LOSS_DOMAINS = {
    "squared_error": (normal, normal),
    "binary_cross_entropy": (unit_open, binary),
    "cross_entropy": (softmax_rows, one_hot),
    "poisson": (exp_out, counts),
}


def _loss(j):
    a_dom, t_dom = _LOSS_DOMAINS[j]
    fwd = (
        Arg("a", (M, N), a_dom),
        Arg("t", (M, N), t_dom),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    )
    bwd = (
        Arg("a", (M, N), a_dom),
        Arg("t", (M, N), t_dom),
        Arg("c", None, 1.0 / M),
        Arg("out", (M, N), role="out"),
        Arg("scratch", (M, N), role="aux"),
    )
    return {f"{j}_fwd": fwd, f"{j}_bwd": bwd}


def _vec(name, domain=normal, role="in"):
    return Arg(name, (P,), domain, role)


# momentum and Nesterov updates: w, g, the velocity v, lr, mu
_MOMENTUM_ARGS = (
    _vec("w", role="io"),
    _vec("g"),
    _vec("v", role="io"),
    Arg("lr", None, 0.1),
    Arg("mu", None, 0.9),
    _vec("scratch", role="aux"),
)

SIGNATURES = {
    "colsum": (Arg("d", (M, N)), Arg("out", (N,), role="out")),
    **{k: v for g in ACTIVATIONS for k, v in _act(g).items()},
    **{k: v for j in LOSSES for k, v in _loss(j).items()},
    "sigmoid_binary_cross_entropy_fwd": (
        Arg("z", (M, N), logits),
        Arg("t", (M, N), binary),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    ),
    "softmax_cross_entropy_fwd": (
        Arg("z", (M, N), logits),
        Arg("t", (M, N), one_hot),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    ),
    "exp_poisson_fwd": (
        Arg("z", (M, N), logits),
        Arg("t", (M, N), counts),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    ),
    "sgd_update": (_vec("w", role="io"), _vec("g"), Arg("lr", None, 0.1), _vec("scratch", role="aux")),
    "momentum_update": _MOMENTUM_ARGS,
    "nesterov_update": _MOMENTUM_ARGS,  # the same arguments, another update
    "adam_update": (
        _vec("w", role="io"),
        _vec("g"),
        _vec("m", role="io"),
        _vec("v", positive, "io"),
        Arg("lr_t", None, 0.01),
        Arg("beta1", None, 0.9),
        Arg("beta2", None, 0.999),
        Arg("eps", None, 1e-8),
        _vec("scratch", role="aux"),
    ),
    "l2_grad": (
        _vec("g", role="io"),
        _vec("w"),
        _vec("mask", binary),
        Arg("alpha", None, 1e-2),
        _vec("scratch", role="aux"),
    ),
    "outer_sgd_update": (
        Arg("wt", (N_IN, N), role="io"),
        Arg("b", (N,), role="io"),
        Arg("a", (N_IN,)),
        Arg("delta", (N,)),
        Arg("lr", None, 0.1),
        Arg("scratch", (N_IN, N), role="aux"),
    ),
}


def _canonical(loss):
    a_dom, t_dom = _LOSS_DOMAINS[loss]
    return (
        Arg("z", (M, N), logits),
        Arg("a", (M, N), a_dom),
        Arg("t", (M, N), t_dom),
        Arg("c", None, 1.0 / M),
        Arg("delta", (M, N), role="out"),
        Arg("scratch", (M, N), role="aux"),
        Arg("rows", (M, 2), role="aux"),
    )


# canonical_value_and_delta takes the loss name first: one case family per loss.
CANONICAL = {f"canonical_value_and_delta/{loss}": _canonical(loss) for loss in LOSSES}


def checked_ops():
    """The ops with a generated CUDA kernel, in OPS order (canonical_value_and_delta once per loss)."""
    ops = []
    for op in OPS:
        if op in NOT_GENERATED:
            continue
        family = [name for name in CANONICAL if name.split("/")[0] == op]
        if not family and op not in SIGNATURES:
            raise KeyError(f"bpgpu.testing.cases has no argument description for {op!r}")
        ops += family or [op]
    return tuple(ops)


def _layout(values, dtype, layout, role, rng):
    """An array holding ``values`` in the requested memory layout."""
    if layout == "broadcast" and role == "in" and values.ndim >= 1 and values.shape[0] > 1:
        row = values[rng.integers(values.shape[0])]
        return np.broadcast_to(np.asarray(row, dtype), values.shape)
    if layout == "strided":
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype)
        view = big[..., 1::2]
        view[...] = values
        return view
    return np.array(values, dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    dtype: type
    layout: str

    @property
    def id(self):
        return f"{self.op}-{np.dtype(self.dtype).name}-{self.layout}"

    def signature(self):
        return CANONICAL[self.op] if self.op in CANONICAL else SIGNATURES[self.op]

    def call(self, module, args):
        """The op of ``module`` (a kernel table: bpgpu.kernels.cuda, .cpu or .generic) on ``args``."""
        op, _, loss = self.op.partition("/")
        return getattr(module, op)(*((loss,) if loss else ()), *args)

    def reference(self, args):
        """The array-API reference table on ``args`` (float64 numpy copies), in place; its return value."""
        from bpgpu.kernels import generic

        return self.call(generic, args)

    def build(self, seed=0):
        """The arguments (numpy arrays and Python scalars) of one call."""
        key = sum(map(ord, self.op))  # stable across runs, unlike hash()
        rng = np.random.default_rng([seed, key, LAYOUTS.index(self.layout), np.dtype(self.dtype).itemsize])
        args, by_name = [], {}
        for arg in self.signature():
            if arg.alias and self.layout == "inplace":
                args.append(by_name[arg.alias])
            elif arg.shape is None:
                args.append(arg.domain)
            elif arg.role == "out":
                args.append(_layout(np.zeros(arg.shape), self.dtype, self.layout, arg.role, rng))
            else:
                domain = EXTREME.get(arg.domain, arg.domain) if self.layout == "extreme" else arg.domain
                values = domain(rng, arg.shape)
                args.append(_layout(values, self.dtype, self.layout, arg.role, rng))
            by_name[arg.name] = args[-1]
        return args

    def launches_kernels(self):
        """False only where the op has nothing to compute: identity_bwd with out = s."""
        return not (self.op == "identity_bwd" and self.layout == "inplace")

    def compared(self):
        """Indices of the arguments compared after the call (all but the numpy-only buffers)."""
        return [i for i, a in enumerate(self.signature()) if a.shape is not None and a.role != "aux"]


def _has_alias(op):
    sig = CANONICAL.get(op) or SIGNATURES[op]
    return any(a.alias for a in sig)


def _applies(op, dtype, layout):
    if layout == "inplace":
        return _has_alias(op)
    if layout == "extreme":
        return np.dtype(dtype) != np.float16
    return True


def all_cases(dtypes=DTYPES, layouts=LAYOUTS):
    return [Case(op, dt, lay) for op in checked_ops() for dt in dtypes for lay in layouts if _applies(op, dt, lay)]
