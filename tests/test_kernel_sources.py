"""CuPy kernels checked without a GPU (bpgpu.testing; docs/guide/gpu.rst).

1. The exact source CuPy generates for every kernel of bpgpu.kernels.cuda compiles
   with NVRTC for float16/32/64 and sm_80/sm_90.
2. That source, run on the CPU (g++ against CuPy's own headers), makes every op
   match the array-API reference on random, broadcast and strided inputs.
3. Each check fails on a deliberately broken kernel.
Skipped only when CuPy or NVRTC cannot be imported (the ``kernel-check`` extra).
"""

import dataclasses

import numpy as np
import pytest

from bpgpu.kernels import cuda
from bpgpu.testing import cases, checks, host, runner, sources

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    pytest.skip(f"cupy is not importable ({exc}); install bpgpu[kernel-check]", allow_module_level=True)
_nvrtc_ok, _nvrtc_why = sources.nvrtc_available()
if not _nvrtc_ok:  # pragma: no cover
    pytest.skip(f"{_nvrtc_why}; install bpgpu[kernel-check] (cuda-toolkit[nvrtc,cudart])", allow_module_level=True)

CASES = cases.all_cases()
KERNEL_NAMES = sorted(cuda.SPECS)
DTYPE_NAMES = [np.dtype(d).name for d in cases.DTYPES]


@pytest.fixture(scope="session")
def host_run():
    """Every op × dtype × layout run once on the CPU, sharing one g++ build."""
    session = runner.HostSession()
    results = checks.run_cases(CASES, session=session)
    return {r.case.id: r for r in results}, session


def test_cupy_internals_are_the_pinned_ones(monkeypatch):
    assert sources.require_cupy() is cupy
    monkeypatch.setattr(cupy, "__version__", "99.0.0")
    with pytest.raises(
        sources.CupyInternalsError, match=r"CuPy internals checked against CuPy 14\.2\.x; installed: 99\.0\.0"
    ):
        sources.require_cupy.__wrapped__()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_on_cpu_matches_numpy_twin(host_run, case):
    result = host_run[0][case.id]
    assert result.ok, f"{case.id} (kernels {', '.join(result.kernels)}): {result.failure}"


def test_every_kernel_is_exercised(host_run):
    launched = set(host_run[1].launched)
    assert set(KERNEL_NAMES) <= launched, f"never executed: {sorted(set(KERNEL_NAMES) - launched)}"


@pytest.mark.parametrize("arch", sources.ARCHS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_generated_source_compiles_with_nvrtc(host_run, name, dtype, arch):
    results, session = host_run
    codes = {
        code
        for r in results.values()
        if r.case.layout == "random" and np.dtype(r.case.dtype).name == dtype
        for code in r.sources
        if session.launches[code].name == name
    }
    assert codes, f"no call of {name} in {dtype} was recorded"
    for code in sorted(codes):
        sources.nvrtc_compile(session.launches[code], arch)


# --- each check fails on a deliberately broken kernel -----------------------------
# The breakages are built from the kernels' parameter lists, not from the text of
# their bodies, so they keep working when a body is rewritten.


def _broken(name, **changes):
    spec = dataclasses.replace(cuda.SPECS[name], **changes)
    assert spec != cuda.SPECS[name], "the edit must change the kernel"
    return spec.build(cupy, name)


def _last_output(name):
    return cuda.SPECS[name].out_params.split(",")[-1].split()[-1]


def _off_by_one_percent(name):
    """The kernel with its last output (elementwise) or every mapped term (reduction) 1 % off."""
    spec = cuda.SPECS[name]
    if isinstance(spec, cuda.Reduction):
        return _broken(name, map_expr=f"({spec.map_expr}) * T(1.01)")
    out = _last_output(name)
    return _broken(name, operation=f"{spec.operation} {out} = T({out} * T(1.01));")


def _with_operation(name, operation, *params):
    spec = cuda.SPECS[name]
    missing = [p for p in params if p not in f"{spec.in_params}, {spec.out_params}".replace(",", " ").split()]
    assert not missing, f"{name} no longer has the parameters {missing} this test's body uses"
    return _broken(name, operation=operation)


def test_a_typo_fails_to_compile_and_shows_the_nvrtc_log():
    out = _last_output("sigmoid_fwd")
    typo = _broken("sigmoid_fwd", operation=f"{cuda.SPECS['sigmoid_fwd'].operation} {out} = tanhh({out});")
    z, b, act = np.zeros((4, 3), np.float32), np.zeros(3, np.float32), np.zeros((4, 3), np.float32)
    launch, _ = sources.plan(typo, b, z, act)
    with pytest.raises(sources.KernelCompileError) as info:
        sources.nvrtc_compile(launch, "sm_90")
    message = str(info.value)
    assert 'identifier "tanhh" is undefined' in message  # NVRTC's log
    assert "--- generated source" in message and "tanhh(" in message  # the numbered source it refers to
    with pytest.raises(host.HostCompileError, match="tanhh"):  # and the CPU build fails as well
        host.build([launch])


@pytest.mark.parametrize(
    ("op", "kernel", "layout"),
    [
        ("sigmoid_fwd", "sigmoid_fwd", "random"),  # an activation
        ("colsum", "colsum", "strided"),  # a reduction, on strided δ
        ("softmax_fwd", "softmax_fwd_rowsum", "broadcast"),  # a row reduction feeding an elementwise pass
        ("adam_update", "adam_update", "random"),  # an optimizer's state (v is Adam's last output)
        ("canonical_value_and_delta/cross_entropy", "softmax_cross_entropy_value_and_delta", "random"),  # loss + δ
    ],
)
def test_wrong_arithmetic_fails_the_cpu_comparison(host_run, op, kernel, layout):
    case = cases.Case(op, np.float32, layout)
    assert host_run[0][case.id].ok  # the intact kernel passes...
    result = checks.run_cases([case], replace={kernel: _off_by_one_percent(kernel)})[0]
    assert not result.ok and "reference" in result.failure  # ...the broken one does not
    assert kernel in result.kernels


def test_an_unsafe_softmax_passes_ordinary_inputs_and_fails_extreme_ones():
    # e^v / (Σ e^{v − top} · e^top) is softmax too, but e^v overflows for large logits.
    naive = _with_operation(
        "softmax_fwd",
        "const T v = T(z + bias); z = v; act = T(exp(v) / (total_exp * exp(top)));",
        "bias",
        "top",
        "total_exp",
        "z",
        "act",
    )
    ordinary, extreme = checks.run_cases(
        [cases.Case("softmax_fwd", np.float32, layout) for layout in ("random", "extreme")],
        replace={"softmax_fwd": naive},
    )
    assert ordinary.ok
    assert not extreme.ok and "nan" in extreme.failure


def test_a_stride_bug_passes_contiguous_inputs_and_fails_the_strided_layout():
    # Indexing a raw argument through its data pointer ignores its strides.
    ignores_strides = _with_operation(
        "outer_sgd_update",
        "wt = T(wt - lr * (a_col * d_row)); if (i < bias.size()) bias[i] = T(bias[i] - lr * (&d_raw[0])[i]);",
        "a_col",
        "d_row",
        "d_raw",
        "lr",
        "wt",
        "bias",
    )
    contiguous, strided = checks.run_cases(
        [cases.Case("outer_sgd_update", np.float32, layout) for layout in ("random", "strided")],
        replace={"outer_sgd_update": ignores_strides},
    )
    assert contiguous.ok
    assert not strided.ok and strided.worst == "b"


def test_an_op_that_bypasses_the_kernels_is_flagged(monkeypatch):
    # A CUDA op that computes on the host instead of launching its kernel must not pass.
    from bpgpu.kernels import cpu

    monkeypatch.setattr(cuda, "sigmoid_fwd", cpu.sigmoid_fwd)
    result = checks.run_cases([cases.Case("sigmoid_fwd", np.float64, "random")])[0]
    assert not result.ok and "launched no kernel" in result.failure


# --- on a GPU: the source planned here is the one CuPy really compiles --------------

_GPU = __import__("bpgpu").gpu_status()


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU.usable, reason=f"no usable GPU: {_GPU.reason}")
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=DTYPE_NAMES)
def test_planned_source_is_the_one_cupy_compiles(monkeypatch, dtype):
    """Every kernel call's source, as bpgpu.testing plans it from numpy arrays, equals the
    source CuPy generates for the same call on device arrays (its ``cached_codes``)."""
    plans = []
    for case in (c for c in CASES if c.layout == "random" and c.dtype is dtype):
        session = runner.HostSession()
        with checks.kernels_on_host(cuda):
            session.record(case.call, cuda, case.build())
        plans.append((case, {(session.launches[code].name, code) for code in session.planned}))
    fresh = {}  # new kernel objects per case, so cached_codes holds this call's sources only
    monkeypatch.setattr(cuda, "kernel", lambda name: fresh.setdefault(name, cuda.SPECS[name].build(cupy, name)))
    mismatches = []
    for case, planned in plans:
        fresh.clear()
        case.call(cuda, [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in case.build()])
        cupy.cuda.Device().synchronize()
        compiled = {(name, code) for name, k in fresh.items() for code in k.cached_codes.values()}
        if compiled != planned:
            mismatches.append(
                f"{case.id}: planned only {sorted(n for n, _ in planned - compiled)}, "
                f"CuPy only {sorted(n for n, _ in compiled - planned)}"
            )
    assert not mismatches, "\n".join(mismatches)
