"""ONNX export: ``to_onnx(model, path=None, opset=None)`` for MLP, MLPClassifier and MLPRegressor.

The graph is the feed forward of the seeds, one layer at a time: with the batch
X row-major (m, n0), a(0) = X and for l = 1..L

    z(l) = a(l−1) Wᵀ(l) + b(l)      (MatMul + Add: Θ(l) = [b(l) | W(l)], a_0 = 1)
    a(l) = g(z(l))

with Wᵀ(l) (n_{l−1}, n_l) and b(l) (n_l,) as initializers in the model's dtype
(float32 or float64). The activations g, in ONNX operators (each exact to a few
ulp, so that onnxruntime matches bpgpu to float precision; the plain operator
wherever onnxruntime has an accurate kernel for both dtypes):

    identity    a = z                                   (no node)
    sigmoid     a = 1 / (1 + e^{−z})                    Neg, Exp, Add, Reciprocal
    tanh        a = tanh z                              Tanh
    relu        a = max(z, 0)                           Relu
    leaky_relu  a = max(z, 0.01 z)                      Mul, Max
    softplus    a = max(z, 0) + log1p(e^{−|z|})         Relu, Abs, Neg, Exp, log1p (below), Add
    softmax     a_k = e^{z_k} / Σ_j e^{z_j}             Softmax(axis=1)
    exp         a = e^z (Poisson's log link)            Exp

Why not the Sigmoid, LeakyRelu and Softplus operators: onnxruntime 1.32's
float32 Sigmoid is off by up to 1.2e-5 relative for z in [−5, 0] (and by
orders of magnitude below −10), and it has no float64 kernel for LeakyRelu or
Softplus. log1p(u), which ONNX lacks, is Goldberg's exact form
u · log(w) / (w − 1) with w = 1 + u (u itself where w rounds to 1).

Outputs:

    MLP            "Y" = a(L), (N, nL)
    MLPRegressor   "variable" = a(L), (N, n_outputs), as skl2onnx names it
    MLPClassifier  "label" (N,) and "probabilities" (N, n_classes), skl2onnx's
                   outputs with ``zipmap=False``: multiclass softmax; binary
                   [1 − σ, σ]; label = classes_[argmax] (ArgMax,
                   ArrayFeatureExtractor, Reshape). Multilabel: probabilities
                   σ (N, n_labels), label the indicator [σ > 0.5] as int64
                   (N, n_labels), scikit-learn's threshold.

Integer (and boolean) classes give an int64 label, string classes a string
label. N is a symbolic batch dimension.

Versions: IR version 10 and opset 21 of the default domain by default (any opset
in 13..21 on request; 13 is the first whose Softmax takes an axis over one
dimension), plus version 1 of ``ai.onnx.ml`` for the classifier's
ArrayFeatureExtractor. Tested with onnx 1.23 and onnxruntime 1.32.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "bpgpu.to_onnx needs the onnx package, an optional dependency: pip install 'bpgpu[onnx]'"
    ) from exc

from bpgpu import io
from bpgpu.backend import to_numpy
from bpgpu.kernels import LEAKY_SLOPE
from bpgpu.network import MLP

IR_VERSION = 10
OPSET = 21
MIN_OPSET = 13
ML_OPSET = 1  # ai.onnx.ml: ArrayFeatureExtractor

ELEMENT_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
# scikit-learn's activation names (MLP*.activation, out_activation_) -> bpgpu's
_SKLEARN_ACTIVATIONS = {"logistic": "sigmoid"}


class _Graph:
    """Nodes and initializers in the model's dtype, with unique value names."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}
        self._constants: dict[float, str] = {}

    def name(self, base: str) -> str:
        k = self._count.get(base, 0)
        self._count[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs: Any) -> str:
        """Append one node; returns the name of its output."""
        out = out or self.name(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=self.name(f"{op_type}_node"), domain=domain, **attrs)
        )
        return out

    def tensor(self, base: str, value: Any, dtype: Any = None) -> str:
        """An initializer holding ``value`` (in the model's dtype unless ``dtype`` is given)."""
        name = self.name(base)
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        if array.dtype.kind in "UO":
            proto = helper.make_tensor(name, TensorProto.STRING, array.shape, [str(s).encode() for s in array.flat])
        else:
            proto = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers.append(proto)
        return name

    def scalar(self, value: float) -> str:
        """One shared initializer per scalar constant."""
        if value not in self._constants:
            self._constants[value] = self.tensor("const", value)
        return self._constants[value]


# --- activations -------------------------------------------------------------------


def _log1p(g: _Graph, u: str) -> str:
    """log(1 + u) to full relative precision for small u (Goldberg): u log(w) / (w − 1), w = 1 + u."""
    w = g.op("Add", u, g.scalar(1.0))
    ratio = g.op("Div", g.op("Mul", u, g.op("Log", w)), g.op("Sub", w, g.scalar(1.0)))
    return g.op("Where", g.op("Equal", w, g.scalar(1.0)), u, ratio)


def _activation(g: _Graph, name: str, z: str, out: str | None) -> str:
    """a = g(z) as nodes (the table in the module docstring); ``out`` names the result."""
    if name == "identity":
        return g.op("Identity", z, out=out) if out else z
    if name == "sigmoid":
        exp = g.op("Exp", g.op("Neg", z))
        return g.op("Reciprocal", g.op("Add", exp, g.scalar(1.0)), out=out)
    if name in ("tanh", "relu"):
        return g.op(name.capitalize(), z, out=out)
    if name == "leaky_relu":
        return g.op("Max", z, g.op("Mul", z, g.scalar(LEAKY_SLOPE)), out=out)
    if name == "softplus":
        tail = _log1p(g, g.op("Exp", g.op("Neg", g.op("Abs", z))))
        return g.op("Add", g.op("Relu", z), tail, out=out)
    if name == "softmax":
        return g.op("Softmax", z, out=out, axis=1)
    if name == "exp":
        return g.op("Exp", z, out=out)
    raise ValueError(f"no ONNX form for the activation {name!r}")


def _layers(g: _Graph, x: str, layers: list[tuple[np.ndarray, np.ndarray, str]], out: str | None) -> str:
    """The feed forward: for each (Wᵀ(l), b(l), g_l), a(l) = g_l(a(l−1) Wᵀ(l) + b(l))."""
    a = x
    for l, (wt, b, act) in enumerate(layers, start=1):
        z = g.op("Add", g.op("MatMul", a, g.tensor(f"W{l}T", wt)), g.tensor(f"b{l}", b), out=g.name(f"z{l}"))
        a = _activation(g, act, z, out if l == len(layers) else None)
    return a


# --- the models ----------------------------------------------------------------------


def _mlp_layers(net: MLP) -> list[tuple[np.ndarray, np.ndarray, str]]:
    layers = []
    for l in range(1, net.n_layers + 1):
        theta = to_numpy(net.theta(l))  # (n_l, n_{l−1} + 1), the bias in column 0; device → host
        layers.append((theta[:, 1:].T, theta[:, 0], net.activations[l - 1].name))
    return layers


def _estimator_layers(est: Any) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Wᵀ(l) = coefs_[l−1], b(l) = intercepts_[l−1], g from scikit-learn's activation names."""
    hidden = _SKLEARN_ACTIVATIONS.get(est.activation, est.activation)
    output = _SKLEARN_ACTIVATIONS.get(est.out_activation_, est.out_activation_)
    names = [hidden] * (len(est.coefs_) - 1) + [output]
    return [(np.asarray(w), np.asarray(b), act) for w, b, act in zip(est.coefs_, est.intercepts_, names)]


def _class_labels(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """classes_ as an initializer's values and the label's ONNX element type."""
    if classes.dtype.kind in "biu":
        return classes.astype(np.int64), TensorProto.INT64
    if classes.dtype.kind == "f" and np.all(classes == np.round(classes)):
        return classes.astype(np.int64), TensorProto.INT64  # scikit-learn accepts integral floats
    if classes.dtype.kind in "US" or (classes.dtype.kind == "O" and all(isinstance(c, str) for c in classes)):
        return classes.astype(str), TensorProto.STRING
    raise TypeError(f"cannot export the classes_ {classes!r} of dtype {classes.dtype}: ONNX labels are int64 or string")


def _classifier_outputs(g: _Graph, est: Any, a: str, n: int) -> list[onnx.ValueInfoProto]:
    """skl2onnx's label and probabilities (zipmap=False) from the output activations ``a``."""
    elem = ELEMENT_TYPE[g.dtype]
    n_classes = len(est.classes_)
    if est.out_activation_ == "logistic" and est.n_outputs_ > 1:  # multilabel: threshold each σ at ½
        g.op("Identity", a, out="probabilities")
        g.op("Cast", g.op("Greater", a, g.scalar(0.5)), out="label", to=TensorProto.INT64)
        return [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N", n]),
            helper.make_tensor_value_info("probabilities", elem, ["N", n]),
        ]
    if est.out_activation_ == "logistic":  # binary: one σ column -> [1 − σ, σ]
        g.op("Concat", g.op("Sub", g.scalar(1.0), a), a, out="probabilities", axis=1)
    else:
        g.op("Identity", a, out="probabilities")
    values, label_type = _class_labels(np.asarray(est.classes_))
    index = g.op("ArgMax", "probabilities", axis=1)
    picked = g.op("ArrayFeatureExtractor", g.tensor("classes", values, values.dtype), index, domain="ai.onnx.ml")
    g.op("Reshape", picked, g.tensor("shape", [-1], np.int64), out="label")
    return [
        helper.make_tensor_value_info("label", label_type, ["N"]),
        helper.make_tensor_value_info("probabilities", elem, ["N", n_classes]),
    ]


def _graph_of(model: Any) -> tuple[_Graph, list[onnx.ValueInfoProto], list[onnx.ValueInfoProto], str]:
    """The graph, its inputs and outputs, and the model's kind name."""
    if isinstance(model, MLP):
        g = _Graph(np.dtype(model.dtype))
        layers, kind = _mlp_layers(model), "MLP"
    else:
        estimators = sys.modules.get("bpgpu.estimators")  # no estimator exists unless its module is imported
        if estimators is None or not isinstance(model, (estimators.MLPClassifier, estimators.MLPRegressor)):
            raise TypeError(
                f"to_onnx exports bpgpu.MLP, bpgpu.MLPClassifier and bpgpu.MLPRegressor, got {type(model).__name__}"
            )
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(model)  # NotFittedError (a ValueError) naming the estimator
        g = _Graph(np.asarray(model.coefs_[0]).dtype)  # the fitted precision (dtype=None: the input's)
        layers, kind = _estimator_layers(model), type(model).__name__
    elem = ELEMENT_TYPE[g.dtype]
    n_in, n_out = layers[0][0].shape[0], layers[-1][0].shape[1]
    inputs = [helper.make_tensor_value_info("X", elem, ["N", n_in])]
    if kind == "MLPClassifier":
        outputs = _classifier_outputs(g, model, _layers(g, "X", layers, None), n_out)
    else:
        name = "Y" if kind == "MLP" else "variable"
        _layers(g, "X", layers, name)
        outputs = [helper.make_tensor_value_info(name, elem, ["N", n_out])]
    return g, inputs, outputs, kind


def _opset(opset: Any) -> int:
    if opset is None:
        return OPSET
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= OPSET:
        raise ValueError(
            f"opset must be an int in {MIN_OPSET}..{OPSET} (the default domain's versions "
            f"this exporter writes with IR version {IR_VERSION}), got {opset!r}"
        )
    return int(opset)


def to_onnx(model: Any, path: str | os.PathLike | None = None, opset: int | None = None) -> onnx.ModelProto:
    """Export a net or a fitted estimator as an ONNX model (the graph in the module docstring).

    Parameters
    ----------
    model : bpgpu.MLP, bpgpu.MLPClassifier or bpgpu.MLPRegressor
        A net (on any backend; its parameters are copied to the host), or a
        fitted estimator.
    path : str or os.PathLike, optional
        Where to write the model. Written atomically, as :func:`bpgpu.save`
        writes: a crash or an error leaves the old file or the new one, never
        half of one.
    opset : int, optional
        Version of the default ONNX domain, 13..21; default 21. The IR version is
        always 10.

    Returns
    -------
    onnx.ModelProto
        The model, checked with ``onnx.checker.check_model(full_check=True)``.
        Its input is "X", (N, n0), in the model's dtype (float32 or float64);
        its outputs are "Y" (N, nL) for an MLP, "variable" (N, n_outputs) for a
        regressor, "label" and "probabilities" for a classifier.

    Raises
    ------
    TypeError
        For anything but the three model types.
    sklearn.exceptions.NotFittedError
        For an estimator that is not fitted.
    ValueError
        For an opset outside 13..21.
    OSError
        When ``path`` cannot be written (it names the path); nothing is left there.

    Examples
    --------
    >>> import numpy as np, onnxruntime as ort, bpgpu as bp
    >>> net = bp.MLP([3, 5, 2], hidden="tanh", output="softmax", loss="cross_entropy", dtype="float64", seed=0)
    >>> session = ort.InferenceSession(bp.to_onnx(net).SerializeToString(), providers=["CPUExecutionProvider"])
    >>> X = np.random.default_rng(0).normal(size=(4, 3))
    >>> bool(np.allclose(session.run(None, {"X": X})[0], net.forward(X), rtol=1e-12))
    True
    """
    version = _opset(opset)
    g, inputs, outputs, kind = _graph_of(model)
    from bpgpu import __version__

    graph = helper.make_graph(g.nodes, f"bpgpu_{kind}", inputs, outputs, initializer=g.initializers)
    imports = [helper.make_opsetid("", version)]
    if any(node.domain == "ai.onnx.ml" for node in g.nodes):
        imports.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    proto = helper.make_model(
        graph,
        opset_imports=imports,
        ir_version=IR_VERSION,
        producer_name="bpgpu",
        producer_version=__version__,
        doc_string=f"bpgpu {kind}",
    )
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        data = proto.SerializeToString()
        io.atomic_write(path, lambda f: f.write(data))
    return proto
