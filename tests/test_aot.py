"""The kernels compiled ahead of time (bpgpu.kernels.aot) against numba's JIT of the same kernels.

Every export of the extension is a call of one dispatcher of bpgpu.kernels.compiled, compiled by
pycc with the dispatcher's own options for this CPU ("host"), so it must give the JIT's results
bit for bit: the tests compare with ``np.testing.assert_array_equal`` (and ``==`` for the losses),
on hypothesis-drawn nets, both dtypes, weights None and given. Then: a default fit in a fresh
process never imports numba and predicts what the JIT predicts, a stale digest sends every kernel
to the JIT with the reason, and the export list covers every kernel the default fits reach.

Skipped, with the reason, when the extension is not built or not fresh (``python -m
bpgpu.kernels.aot build``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpgpu as bp
from bpgpu import activations
from bpgpu.kernels import LOSSES, aot, codes, jit, provider

pytest.importorskip("numba", reason="numba is not installed: no compiled kernels at all")
from bpgpu.kernels import compiled  # noqa: E402  (after the skip)

ROOT = Path(__file__).resolve().parent.parent
EXT = provider.load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"the ahead-of-time extension is not used: {provider.reason}")

PAIRS = (
    [(g, "squared_error") for g in activations.OUTPUT]
    + [(g, loss) for g in ("sigmoid", "softmax") for loss in ("binary_cross_entropy", "cross_entropy")]
    + [(g, "poisson") for g in ("exp", "softplus")]
)
DT = {"float32": "f4", "float64": "f8"}


def targets(rng, output, loss, m, n, dtype):
    if loss == "poisson":
        return rng.poisson(1.5, size=(m, n)).astype(dtype)
    if output in ("softmax", "sigmoid"):
        return (
            rng.dirichlet(np.ones(n), size=m).astype(dtype)
            if output == "softmax"
            else rng.uniform(size=(m, n)).astype(dtype)
        )
    return rng.standard_normal((m, n)).astype(dtype)


nets = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 9), min_size=2, max_size=5),
        "hidden": st.sampled_from(activations.HIDDEN),
        "pair": st.sampled_from(PAIRS),
        "dtype": st.sampled_from(["float32", "float64"]),
        "m": st.integers(1, 12),
        "seed": st.integers(0, 2**31 - 1),
        "weighted": st.booleans(),
    }
)


def export(kernel, dtype, suffix=""):
    return getattr(EXT, f"{kernel.lstrip('_')}{suffix}_{DT[dtype]}")


@needs_ext
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=nets,
    rule=st.sampled_from([codes.GRADIENT_ONLY, codes.SGD, codes.MOMENTUM, codes.NESTEROV]),
    mean=st.booleans(),
    alpha=st.sampled_from([0.0, 0.3]),
)
def test_train_step_export_is_the_jit_bit_for_bit(case, rule, mean, alpha):
    output, loss = case["pair"]
    if case["sizes"][-1] < 2 and output == "softmax":
        case["sizes"][-1] = 2
    sizes, dtype, m = case["sizes"], case["dtype"], case["m"]
    rng = np.random.default_rng(case["seed"])
    net = bp.MLP(sizes, hidden=case["hidden"], output=output, loss=loss, dtype=dtype, backend="numpy", seed=1)
    X = rng.standard_normal((m, sizes[0])).astype(dtype)
    T = targets(rng, output, loss, m, sizes[-1], dtype)
    s = rng.uniform(0.0, 2.0, m).astype(dtype) if case["weighted"] else None
    plan = jit.plan(net, None)
    length = m * (2 * sum(sizes[1:]) + sizes[-1]) + max(sizes[1:]) + 2
    results = []
    for run in ("jit", "aot"):
        w, velocity = net.params.copy(), np.full(net.n_params, 0.25, dtype)
        grad, work = np.zeros(net.n_params, dtype), np.zeros(length, dtype)
        head = (X, T, w, grad, work, plan, LOSSES.index(loss), mean, alpha, rule, 0.1, 0.9, velocity)
        if run == "jit":
            value = compiled.train_step(*head, s)
        elif s is None:
            value = export("train_step", dtype)(*head)
        else:
            value = export("train_step", dtype, "_weighted")(*head, s)
        results.append((value, w, grad, velocity))
    (v0, *arrays0), (v1, *arrays1) = results
    assert v0 == v1 or (np.isnan(v0) and np.isnan(v1))
    for a, b in zip(arrays0, arrays1):
        np.testing.assert_array_equal(a, b)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(case=nets, code=st.integers(0, len(activations.OUTPUT) - 1), c=st.sampled_from([1.0, 0.125]))
def test_table_kernel_exports_are_the_jit_bit_for_bit(case, code, c):
    dtype, m, n = case["dtype"], case["m"], max(case["sizes"][0], 2)
    rng = np.random.default_rng(case["seed"])
    z, b = (4 * rng.standard_normal((m, n))).astype(dtype), rng.standard_normal(n).astype(dtype)
    a, s = rng.uniform(0.01, 0.99, (m, n)).astype(dtype), rng.standard_normal((m, n)).astype(dtype)
    t = rng.uniform(size=(m, n)).astype(dtype)

    def both(kernel, *args, copies=()):
        """kernel(*args) by the JIT and by the export, on fresh copies of the arguments at ``copies``."""
        out = []
        for fn in (getattr(compiled, kernel), export(kernel, dtype)):
            mine = [x.copy() if i in copies else x for i, x in enumerate(args)]
            value = fn(*mine)
            out.append((None if isinstance(value, np.ndarray) else value, [mine[i] for i in copies]))
        (v0, arrays0), (v1, arrays1) = out
        assert v0 == v1 or (np.isnan(v0) and np.isnan(v1)), kernel
        for x, y in zip(arrays0, arrays1):
            np.testing.assert_array_equal(x, y, err_msg=kernel)

    both("_activate", code, z, b, np.empty_like(z), copies=(1, 3))
    inplace = [z.copy(), z.copy()]  # out is z: the in-place loop
    compiled._activate(code, inplace[0], b, inplace[0])
    export("_activate", dtype)(code, inplace[1], b, inplace[1])
    np.testing.assert_array_equal(*inplace)
    both("_derive", code, s, a, np.empty_like(s), copies=(3,))
    for loss in range(len(LOSSES)):
        both("_loss_sum", loss, a, t, False)
        both("_loss_sum", loss, z, t, True)
        both("_loss_grad", loss, a, t, c, np.empty_like(a), copies=(4,))
    both("_residual", a, t, c, np.empty_like(a), copies=(3,))
    w, g, v, mom = (rng.standard_normal(3 * n).astype(dtype) for _ in range(4))
    both("_sgd", w, g, 0.1, copies=(0,))
    both("_momentum", w, g, v, 0.1, 0.9, case["weighted"], copies=(0, 2))
    both("_adam", w, g, mom, np.abs(v), 1e-3, 0.9, 0.999, 1e-8, copies=(0, 2, 3))
    both("_l2", g, w, (rng.uniform(size=3 * n) > 0.3).astype(dtype), 1e-2, copies=(0,))
    z[0, 0] = np.nan if case["weighted"] else z[0, 0]
    both("all_finite", z)


@needs_ext
def test_the_provider_sends_what_no_export_fits_to_the_jit():
    """A strided, float16 or read-only-but-contiguous argument: strided and float16 go to numba's
    dispatcher (the export would misread them), contiguous read-only arrays to the export."""
    from bpgpu.kernels import cpu

    z = np.arange(12.0).reshape(3, 4)
    calls = []
    kernel = provider.Kernel("_activate")
    kernel._jit = lambda *args: calls.append(args)  # a stand-in for numba's dispatcher, counted
    out = np.empty((3, 4))
    kernel(codes.TANH, z, np.zeros(4), out)
    assert not calls and np.allclose(out, np.tanh(z))
    kernel(codes.TANH, z[:, ::2], np.zeros(2), np.empty((3, 2)))
    kernel(codes.TANH, z.astype(np.float16), np.zeros(4, np.float16), np.empty((3, 4), np.float16))
    kernel(codes.TANH, z, np.zeros(4, np.float32), out)  # dtypes mixed: no export has them
    assert len(calls) == 3
    assert cpu.train_step.exports == 4 and cpu.all_finite.exports == 2 and cpu._outer_sgd.exports == 0


@needs_ext
def test_the_compiled_step_calls_the_export_directly_and_rechecks_what_callers_hand_in():
    """jit.CompiledStep matches the export once (the provider's full check), then calls it with a
    check of the arrays its callers hand in: X of another dtype goes to numba's dispatcher."""
    net = bp.MLP([3, 5, 2], dtype="float64", backend="numpy", seed=0)
    step = jit.compiled_train_step(net, 0.1)
    calls = []
    jit_kernel = step._kernel.jit
    step._kernel._jit = lambda *args: calls.append(args) or 0.0  # counted, not compiled for float32 X
    try:
        X, T = np.ones((4, 3)), np.zeros((4, 2))
        step(X, T)
        assert step._exports == {True: EXT.train_step_f8} and not calls
        step(X, T, (np.ones((4, 1)), 0.25))  # weights: the weighted export
        assert step._exports[False] is EXT.train_step_weighted_f8 and not calls
        step(X.astype(np.float32), T)  # no export takes this: numba's dispatcher
        assert len(calls) == 1
    finally:
        step._kernel._jit = jit_kernel


def child(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); it prints one JSON line."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", **env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


DEFAULT_FIT = """
    import json, sys, warnings
    import numpy as np
    import bpgpu as bp
    from sklearn.datasets import load_digits

    warnings.simplefilter("ignore")
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    clf = bp.MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=20, random_state=0).fit(X, y)
    print(json.dumps({"numba": "numba" in sys.modules, "predicted": clf.predict(X).tolist()}))
"""


@needs_ext
def test_a_default_fit_in_a_new_process_never_imports_numba():
    with_aot = child(DEFAULT_FIT)
    without = child(DEFAULT_FIT, BPGPU_AOT="0")
    assert not with_aot["numba"], "the default fit imported numba: a kernel it calls is not exported"
    assert without["numba"]
    assert with_aot["predicted"] == without["predicted"]


EVERY_DEFAULT_PATH = """
    import json, sys, warnings
    import numpy as np
    import bpgpu as bp
    from sklearn.datasets import load_digits

    warnings.simplefilter("ignore")
    X, y = load_digits(return_X_y=True)
    X, y = X[:200], y[:200]
    s = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    for dtype in ("float32", "float64"):
        for solver in ("adam", "sgd"):
            for weights in (None, s):
                for Est, target in ((bp.MLPClassifier, y), (bp.MLPRegressor, y / 9.0)):
                    est = Est(hidden_layer_sizes=(16,), max_iter=3, solver=solver, dtype=dtype)
                    est.fit(X, target, sample_weight=weights)
                    est.predict(X), est.score(X, target)
        for optimizer in ("adam", "sgd", "momentum"):
            net = bp.MLP([64, 16, 10], dtype=dtype, seed=0)
            bp.fit(net, X.astype(dtype), np.eye(10, dtype=dtype)[y], optimizer=optimizer, epochs=2,
                   batch_size=50, progress=False)
            net.predict(X.astype(dtype))
    print(json.dumps({"numba": "numba" in sys.modules,
                      "imported": sorted(m for m in sys.modules if m.startswith("numba"))[:5]}))
"""


@needs_ext
def test_the_exports_cover_every_kernel_of_the_default_paths():
    """MLPClassifier / MLPRegressor fit (adam, sgd; sample weights or not), predict and score, and
    bp.fit with adam / sgd / momentum, in float32 and float64: none of them reaches numba's
    dispatcher (a kernel added to these paths without an export would import numba here)."""
    result = child(EVERY_DEFAULT_PATH)
    assert not result["numba"], result["imported"]


def test_a_stale_extension_sends_every_kernel_to_the_jit(monkeypatch):
    """A digest that differs from the recorded one (a developer edited compiled.py since the build):
    the extension is not used, the reason says so, and the kernels run (by numba's JIT)."""
    if not aot.extension_path().exists():
        pytest.skip(f"the ahead-of-time extension is not built: {provider.reason}")
    monkeypatch.delenv("BPGPU_AOT", raising=False)  # this test is about staleness, whatever the run's setting
    real = aot.digest
    monkeypatch.setattr(aot, "digest", lambda host, directory=aot.HERE: tuple(w ^ 1 for w in real(host, directory)))
    provider.reset()
    try:
        assert provider.load() is None and provider.reason.startswith("stale: ")
        assert "compiled.py" in provider.reason and "python -m bpgpu.kernels.aot build" in provider.reason
        from bpgpu.kernels import cpu

        assert cpu.train_step.exports == 0
        z = np.zeros((2, 3))
        cpu.sigmoid_fwd(z, np.zeros(3), z, None, None)
        assert (z == 0.5).all()
        assert "numba's JIT (ahead-of-time kernels not used: stale" in provider.describe()
    finally:
        monkeypatch.undo()
        provider.reset()
    assert (provider.load() is None) == (EXT is None)


def test_bpgpu_aot_0_runs_the_jit_and_says_so(monkeypatch):
    monkeypatch.setenv("BPGPU_AOT", "0")
    provider.reset()
    jit.forget()
    try:
        assert provider.load() is None and provider.reason == "BPGPU_AOT=0"
        net = bp.MLP([3, 4, 2], backend="numpy")
        assert "numba's JIT (ahead-of-time kernels not used: BPGPU_AOT=0)" in net.backend.reason
    finally:
        monkeypatch.undo()
        provider.reset()
        jit.forget()


@needs_ext
def test_the_backend_says_the_extension_runs():
    assert "kernels compiled ahead of time" in bp.MLP([3, 4, 2], backend="numpy").backend.reason


def test_the_extension_file_is_ignored_by_git():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(aot.extension_path().relative_to(ROOT))], cwd=ROOT, capture_output=True
    )
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0


@pytest.mark.slow
def test_pip_wheel_builds_the_extension_into_the_wheel(tmp_path):
    """The build hook end to end: ``pip wheel`` (no build isolation: the installed numba) puts a fresh
    extension into the wheel (about 2 minutes: pycc compiles every export)."""
    import zipfile
    from importlib.metadata import PackageNotFoundError, version

    try:
        setuptools = version("setuptools")
    except PackageNotFoundError:
        setuptools = "0"
    if int(setuptools.split(".")[0]) < 77:  # pyproject.toml's license = "MIT" (PEP 639) needs 77
        pytest.skip(f"setuptools {setuptools} here, the build needs setuptools>=77 (pyproject.toml's build-system)")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "BPGPU_AOT"}, "BPGPU_AOT_CPU": "host"},  # build it
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("bpgpu-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"bpgpu/kernels/{aot.extension_path().name}" in names
