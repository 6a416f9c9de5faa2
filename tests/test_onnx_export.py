"""bp.to_onnx: the exported graphs pass onnx's full check, onnxruntime reproduces bpgpu's
outputs, and the estimators' graphs have skl2onnx's structure and outputs (skl2onnx's
conversion of scikit-learn's MLP with the same weights is the oracle)."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is not installed")
skl2onnx = pytest.importorskip("skl2onnx", reason="skl2onnx (test extra) is not installed")

from sklearn import neural_network  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402

import bpgpu as bp  # noqa: E402
from bpgpu import onnx_export  # noqa: E402
from bpgpu.activations import HIDDEN, OUTPUT, POSITIVE  # noqa: E402

# Tolerances: relative to the largest magnitude of each output (a unit whose z(L) is a
# cancellation near 0 has no relative precision of its own, in bpgpu or in onnxruntime).
RTOL = {"float32": 1e-6, "float64": 1e-12}


def run(model, X):
    """Every output of ``model`` (a ModelProto) on X, by onnxruntime's CPU provider."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})


def assert_close(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def check(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == onnx_export.IR_VERSION


# --- bp.MLP ---------------------------------------------------------------------------

# every activation as hidden and as output, and every loss with each output it accepts
CASES = sorted(
    {(g, g, "squared_error") for g in HIDDEN}
    | {("tanh", g, "squared_error") for g in OUTPUT}
    | {("relu", g, loss) for g in ("sigmoid", "softmax") for loss in ("binary_cross_entropy", "cross_entropy")}
    | {("tanh", g, "poisson") for g in POSITIVE}
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("hidden", "output", "loss"), CASES)
def test_mlp_outputs_equal_bpgpu(hidden, output, loss, dtype):
    net = bp.MLP(
        [5, 8, 6, 3], hidden=hidden, output=output, loss=loss, dtype=dtype, init="glorot", backend="numpy", seed=1
    )
    model = bp.to_onnx(net)
    check(model)
    assert [o.name for o in model.graph.output] == ["Y"]
    X = (3 * np.random.default_rng(2).normal(size=(40, 5))).astype(dtype)
    (Y,) = run(model, X)
    assert_close(Y, net.forward(X), dtype)
    if output == "softmax":
        (node,) = [n for n in model.graph.node if n.op_type == "Softmax"]
        assert onnx.helper.get_attribute_value(node.attribute[0]) == 1 and node.attribute[0].name == "axis"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("g", ["sigmoid", "tanh", "softplus", "leaky_relu", "relu"])
def test_activation_elementwise_over_its_whole_range(g, dtype):
    """One unit, z = x from −40 to 40: each a = g(z) to the dtype's relative precision,
    the tails included (where onnxruntime's own Sigmoid loses digits)."""
    net = bp.MLP([1, 1], output=g, dtype=dtype, backend="numpy")
    net.set_params(np.array([0.0, 1.0]))  # Θ = [b | w] = [0 | 1]
    z = np.linspace(-40, 40, 4001, dtype=dtype).reshape(-1, 1)
    (a,) = run(bp.to_onnx(net), z)
    want = net.forward(z)
    tiny = np.finfo(dtype).tiny  # below it (denormals), relative precision does not exist
    np.testing.assert_allclose(a[want > tiny * 1e3], want[want > tiny * 1e3], rtol=RTOL[dtype], atol=0)


@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    data=st.data(),
)
def test_random_architectures_float64(sizes, data):
    L = len(sizes) - 1
    hidden = data.draw(st.lists(st.sampled_from(HIDDEN), min_size=L - 1, max_size=L - 1))
    output = data.draw(st.sampled_from([g for g in OUTPUT if g != "softmax" or sizes[-1] > 1]))
    net = bp.MLP(
        sizes,
        hidden=hidden,
        output=output,
        dtype="float64",
        init="glorot",
        backend="numpy",
        seed=data.draw(st.integers(0, 2**16)),
    )
    model = bp.to_onnx(net, opset=data.draw(st.integers(onnx_export.MIN_OPSET, onnx_export.OPSET)))
    check(model)
    X = np.random.default_rng(0).normal(size=(data.draw(st.integers(1, 9)), sizes[0]))
    assert_close(run(model, X)[0], net.forward(X), "float64")


def test_versions_are_pinned():
    net = bp.MLP([2, 3, 1], backend="numpy", seed=0)
    model = bp.to_onnx(net)
    assert model.ir_version == 10
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21)}
    low = bp.to_onnx(net, opset=13)
    check(low)
    assert {(o.domain, o.version) for o in low.opset_import} == {("", 13)}
    X = np.ones((2, 2), np.float32)
    np.testing.assert_array_equal(run(low, X)[0], run(model, X)[0])


def test_path_writes_the_model_atomically(tmp_path):
    net = bp.MLP([3, 4, 2], hidden="relu", output="softmax", loss="cross_entropy", backend="numpy", seed=0)
    path = tmp_path / "net.onnx"
    path.write_bytes(b"the old file")
    model = bp.to_onnx(net, path)
    assert onnx.load(path) == model
    assert sorted(os.listdir(tmp_path)) == ["net.onnx"]  # no temporary file left
    bp.to_onnx(net, str(path))  # str paths too
    assert onnx.load(str(path)) == model


# --- the estimators against skl2onnx --------------------------------------------------

# Where the graphs differ from skl2onnx's, on purpose: onnxruntime's Sigmoid is not
# accurate to float precision (see test_activation_elementwise_over_its_whole_range) and it
# has no float64 Binarizer; the Casts and Identities are no-ops on ours.
SUBSTITUTES = {"Sigmoid": ["Neg", "Exp", "Add", "Reciprocal"], "Binarizer": ["Greater"]}


def op_types(model, substitute=False):
    ops = []
    for node in model.graph.node:
        ops += SUBSTITUTES.get(node.op_type, [node.op_type]) if substitute else [node.op_type]
    return [op for op in ops if op not in ("Cast", "Identity")]


def sklearn_twin(est, X, y, **params):
    """scikit-learn's own estimator with ``est``'s weights (fitted one step for its fitted attributes)."""
    cls = getattr(neural_network, type(est).__name__)
    twin = cls(hidden_layer_sizes=est.hidden_layer_sizes, activation=est.activation, max_iter=1, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        twin.fit(X, y)
    twin.coefs_ = [np.array(c) for c in est.coefs_]
    twin.intercepts_ = [np.array(b) for b in est.intercepts_]
    return twin


def fitted(cls, X, y, **params):
    est = cls(max_iter=30, random_state=0, device="cpu", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def compare_with_skl2onnx(est, twin, X, dtype):
    """Same inputs, outputs (names, element types), operators and weights as skl2onnx's graph;
    returns (ours, skl2onnx's) models."""
    ours = bp.to_onnx(est)
    check(ours)
    options = {"zipmap": False} if hasattr(twin, "classes_") else None
    theirs = skl2onnx.to_onnx(twin, X[:1], target_opset=onnx_export.OPSET, options=options)

    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    assert signature(ours.graph.input) == signature(theirs.graph.input)
    assert signature(ours.graph.output) == signature(theirs.graph.output)
    expected = op_types(theirs, substitute=True)
    if not hasattr(twin, "classes_"):
        assert expected.pop() == "Reshape"  # skl2onnx's no-op reshape of (N, n_outputs) to (N, n_outputs)
    assert op_types(ours) == expected
    weights = [onnx.numpy_helper.to_array(t) for t in ours.graph.initializer if t.name[0] in "Wb"]
    reference = [
        onnx.numpy_helper.to_array(t)
        for t in theirs.graph.initializer
        if t.name.startswith(("coefficient", "intercepts"))
    ]
    for w, r in zip(weights, reference, strict=True):
        np.testing.assert_array_equal(w, r.reshape(w.shape))
    return ours, theirs


def _data(n_features=4, m=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, n_features))


TARGETS = {
    "multiclass": lambda X: np.digitize(X[:, 0] + X[:, 1], [-0.5, 0.5]) * 2 - 3,  # classes −3, −1, 1
    "binary": lambda X: np.where(X[:, 0] > 0, "yes", "no"),
    "multilabel": lambda X: (X[:, :3] > 0).astype(int),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["identity", "logistic", "tanh", "relu"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_classifier_matches_skl2onnx(target, activation, dtype):
    X = _data().astype(dtype)
    y = TARGETS[target](X)
    clf = fitted(bp.MLPClassifier, X, y, hidden_layer_sizes=(6, 5), activation=activation, dtype=dtype)
    twin = sklearn_twin(clf, X, y)
    ours, theirs = compare_with_skl2onnx(clf, twin, X, dtype)
    label, proba = run(ours, X)
    assert_close(proba, clf.predict_proba(X), dtype)
    np.testing.assert_array_equal(label, clf.predict(X))
    np.testing.assert_array_equal(label, twin.predict(X))
    if not (target == "multilabel" and dtype == "float64"):  # onnxruntime has no float64 Binarizer
        their_label, their_proba = run(theirs, X)
        # onnxruntime's Sigmoid is accurate only to about 1e-5 relative (float32)
        np.testing.assert_allclose(proba, their_proba, rtol=0, atol=1e-5 if dtype == "float32" else 1e-10)
        np.testing.assert_array_equal(label, their_label.reshape(label.shape))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_outputs", [1, 2])
def test_regressor_matches_skl2onnx(n_outputs, dtype):
    X = _data().astype(dtype)
    y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]], axis=1)[:, :n_outputs].squeeze()
    reg = fitted(bp.MLPRegressor, X, y, hidden_layer_sizes=(7,), activation="tanh", dtype=dtype)
    twin = sklearn_twin(reg, X, y)
    ours, theirs = compare_with_skl2onnx(reg, twin, X, dtype)
    (values,) = run(ours, X)
    assert values.shape == (len(X), n_outputs)
    assert_close(values, reg.predict(X).reshape(-1, n_outputs), dtype)
    assert_close(values, run(theirs, X)[0].reshape(-1, n_outputs), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_poisson_regressor_exports_its_exp_output(dtype):
    """skl2onnx 1.20 cannot convert scikit-learn's MLPRegressor(loss="poisson") (it has no form for
    out_activation_ "exp"), so the oracles are its graph for the identity output with the Exp
    appended, and scikit-learn's own predict with the same weights."""
    X = _data().astype(dtype)
    y = np.exp(0.5 * X[:, 0] - 0.3 * X[:, 1])
    reg = fitted(bp.MLPRegressor, X, y, hidden_layer_sizes=(5,), activation="relu", loss="poisson", dtype=dtype)
    assert reg.out_activation_ == "exp"
    model = bp.to_onnx(reg)
    check(model)
    twin = sklearn_twin(reg, X, y, loss="poisson")
    assert twin.out_activation_ == "exp"
    identity = sklearn_twin(reg, X, y)
    identity_graph = skl2onnx.to_onnx(identity, X[:1], target_opset=onnx_export.OPSET)
    expected = op_types(identity_graph, substitute=True)
    assert expected.pop() == "Reshape"  # skl2onnx's no-op reshape, as for squared error
    assert op_types(model) == [*expected, "Exp"]
    (values,) = run(model, X)
    assert_close(values, reg.predict(X).reshape(-1, 1), dtype)
    assert_close(values, twin.predict(X).astype(dtype).reshape(-1, 1), dtype)
    assert bool(np.all(values > 0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_dtype_follows_the_fitted_precision(dtype):
    """dtype=None is scikit-learn's rule (float32 input stays float32): the graph follows the fit."""
    X = _data().astype(dtype)
    reg = fitted(bp.MLPRegressor, X, X[:, 0] * X[:, 1], hidden_layer_sizes=(3,))
    model = bp.to_onnx(reg)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx_export.ELEMENT_TYPE[np.dtype(dtype)]
    assert_close(run(model, X)[0], reg.predict(X).reshape(-1, 1), dtype)


def test_classifier_on_float_and_bool_labels():
    X = _data()
    for y, label_dtype in [((X[:, 0] > 0) * 2.0, np.int64), (X[:, 0] > 0, np.int64)]:
        clf = fitted(bp.MLPClassifier, X, y, hidden_layer_sizes=(3,), dtype="float64")
        label, _ = run(bp.to_onnx(clf), X)
        assert label.dtype == label_dtype
        np.testing.assert_array_equal(label, clf.predict(X).astype(label_dtype))


# --- bad input --------------------------------------------------------------------------


def test_unfitted_estimator_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    for est in (bp.MLPClassifier(), bp.MLPRegressor()):
        with pytest.raises(NotFittedError, match=f"This {type(est).__name__} instance is not fitted yet"):
            bp.to_onnx(est, path)
    assert not path.exists()


@pytest.mark.parametrize("opset", [12, 22, 7.0, "21", True])
def test_unsupported_opset_raises_and_writes_nothing(opset, tmp_path):
    net = bp.MLP([2, 2], backend="numpy", seed=0)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"opset must be an int in 13\.\.21"):
        bp.to_onnx(net, path, opset=opset)
    assert path.read_bytes() == b"keep me"


def test_unwritable_path_raises_naming_it_and_leaves_nothing(tmp_path):
    net = bp.MLP([2, 2], backend="numpy", seed=0)
    missing = tmp_path / "no such dir" / "m.onnx"
    with pytest.raises(FileNotFoundError, match="no such dir"):
        bp.to_onnx(net, missing)
    target = tmp_path / "a directory"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="a directory"):
        bp.to_onnx(net, target)
    assert sorted(os.listdir(tmp_path)) == ["a directory"] and not os.listdir(target)


def test_other_objects_are_refused():
    with pytest.raises(TypeError, match="to_onnx exports bpgpu.MLP, bpgpu.MLPClassifier and bpgpu.MLPRegressor"):
        bp.to_onnx(neural_network.MLPRegressor())


def test_import_bpgpu_does_not_import_onnx_and_missing_onnx_names_the_extra():
    code = (
        "import sys, bpgpu\n"
        "assert 'onnx' not in sys.modules, 'import bpgpu imported onnx'\n"
        "sys.modules['onnx'] = None  # as if it were not installed\n"
        "try:\n"
        "    bpgpu.to_onnx\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'bpgpu[onnx]'" in out


def test_readme_export_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## ONNX export\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 3
    X = _data()
    clf = fitted(bp.MLPClassifier, X, TARGETS["multiclass"](X), hidden_layer_sizes=(4,))
    monkeypatch.chdir(tmp_path)
    scope = {"bp": bp, "np": np, "onnxruntime": ort, "clf": clf, "X": X}
    exec(compile(code, "README.md", "exec"), scope)
    np.testing.assert_array_equal(scope["label"], clf.predict(X))
    assert_close(scope["proba"], clf.predict_proba(X), str(scope["proba"].dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not bp.gpu_status().usable, reason=f"no usable GPU: {bp.gpu_status().reason}")
def test_a_net_on_the_gpu_exports_as_on_the_cpu():
    on_gpu = bp.MLP(
        [3, 4, 2], hidden="softplus", output="softmax", loss="cross_entropy", dtype="float64", backend="cupy", seed=0
    )
    on_cpu = bp.MLP(
        [3, 4, 2], hidden="softplus", output="softmax", loss="cross_entropy", dtype="float64", backend="numpy", seed=0
    )
    assert bp.to_onnx(on_gpu) == bp.to_onnx(on_cpu)  # the same seed draws the same parameters on the host
