"""CuPy kernels checked without a GPU (bpgpu.testing; shared/research/gpuless-cupy.md).

1. The exact source CuPy generates for every kernel of bpgpu.kernels.cuda compiles
   with NVRTC for float16/32/64 and sm_80/sm_90.
2. That source, run on the CPU (g++ against CuPy's own headers), makes every op
   match its numpy twin on random, broadcast and strided inputs.
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
    with pytest.raises(sources.CupyInternalsError, match=r"CuPy internals checked against CuPy 14\.2\.x; installed: 99\.0\.0"):
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
    codes = {code for r in results.values() if r.case.layout == "random" and np.dtype(r.case.dtype).name == dtype
             for code in r.sources if session.launches[code].name == name}
    assert codes, f"no call of {name} in {dtype} was recorded"
    for code in sorted(codes):
        sources.nvrtc_compile(session.launches[code], arch)


# --- each check fails on a deliberately broken kernel -----------------------------


def _broken(name, **changes):
    spec = dataclasses.replace(cuda.SPECS[name], **changes)
    return spec.build(cupy, name)


def test_a_typo_fails_to_compile_and_shows_the_nvrtc_log():
    spec = cuda.SPECS["sigmoid_fwd"]
    typo = _broken("sigmoid_fwd", operation=spec.operation.replace("tanh(", "tanhh("))
    z, b, out = np.zeros((4, 3), np.float32), np.zeros(3, np.float32), np.zeros((4, 3), np.float32)
    launch, _ = sources.plan(typo, b, z, out)
    with pytest.raises(sources.KernelCompileError) as info:
        sources.nvrtc_compile(launch, "sm_90")
    message = str(info.value)
    assert 'identifier "tanhh" is undefined' in message  # NVRTC's log
    assert "--- generated source" in message and "tanhh(" in message  # the numbered source it refers to
    with pytest.raises(host.HostCompileError, match="tanhh"):  # and the CPU build fails as well
        host.build([launch])


@pytest.mark.parametrize(
    ("op", "kernel", "layout", "changes"),
    [
        # elementwise: σ(v) = (1 + tanh(v/2))/2 with the /2 inside tanh dropped
        ("sigmoid_fwd", "sigmoid_fwd", "random", {"operation": cuda.SPECS["sigmoid_fwd"].operation.replace(
            "tanh(T(0.5) * v)", "tanh(v)")}),
        # reduction: the bias gradient summing δ² instead of δ
        ("colsum", "colsum", "strided", {"map_expr": "delta * delta"}),
        # a row reduction feeding an elementwise pass: e^{z − max} without the bias
        ("softmax_fwd", "softmax_fwd_rowsum", "broadcast", {"map_expr": "exp(z - top)"}),
        # an optimizer's state update: Adam's second moment without (1 − β2)
        ("adam_update", "adam_update", "random", {"operation": cuda.SPECS["adam_update"].operation.replace(
            "(T(1) - beta2) * (g * g)", "(g * g)")}),
        # numerically unsafe: softmax without the max shift overflows e^z for large logits
        ("softmax_fwd", "softmax_fwd", "extreme", {"operation": cuda.SPECS["softmax_fwd"].operation.replace(
            "exp(v - top) / total_exp", "exp(v) / (total_exp * exp(top))")}),
    ],
)
def test_wrong_arithmetic_fails_the_cpu_comparison(host_run, op, kernel, layout, changes):
    assert dataclasses.replace(cuda.SPECS[kernel], **changes) != cuda.SPECS[kernel], "the edit must change the kernel"
    broken = _broken(kernel, **changes)
    case = cases.Case(op, np.float32, layout)
    assert host_run[0][case.id].ok  # the intact kernel passes...
    result = checks.run_cases([case], replace={kernel: broken})[0]
    assert not result.ok and "numpy twin" in result.failure  # ...the broken one does not
    assert kernel in result.kernels


def test_an_op_that_bypasses_the_kernels_is_flagged(monkeypatch):
    # A CUDA op that computes on the host instead of launching its kernel must not pass.
    from bpgpu.kernels import cpu

    monkeypatch.setattr(cuda, "sigmoid_fwd", cpu.sigmoid_fwd)
    result = checks.run_cases([cases.Case("sigmoid_fwd", np.float64, "random")])[0]
    assert not result.ok and "launched no kernel" in result.failure


def test_a_stride_bug_passes_contiguous_inputs_and_fails_the_strided_layout():
    # Indexing a raw argument through its data pointer ignores its strides.
    operation = cuda.SPECS["outer_sgd_update"].operation
    assert "d_raw[i]" in operation
    broken = {"outer_sgd_update": _broken("outer_sgd_update", operation=operation.replace("d_raw[i]", "(&d_raw[0])[i]"))}
    contiguous, strided = checks.run_cases(
        [cases.Case("outer_sgd_update", np.float32, layout) for layout in ("random", "strided")], replace=broken
    )
    assert contiguous.ok
    assert not strided.ok and strided.worst == "b"
