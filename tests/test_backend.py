"""Backend selection: explicit > BPGPU_BACKEND > auto, with reasons."""

import logging

import numpy as np
import pytest

import bpgpu as bp
from bpgpu import backend


def test_auto_picks_numpy_when_no_gpu_and_says_why():
    status = bp.gpu_status()
    assert isinstance(status.reason, str) and status.reason
    chosen = backend.resolve("auto")
    if not status.usable:
        assert chosen.name == "numpy"
        assert status.reason in chosen.reason


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("BPGPU_BACKEND", "cpu")
    assert backend.resolve("auto").name == "numpy"
    assert "BPGPU_BACKEND" in backend.resolve("auto").reason
    monkeypatch.setenv("BPGPU_BACKEND", "quantum")
    with pytest.raises(ValueError, match=r"BPGPU_BACKEND='quantum' is not a backend"):
        bp.MLP([2, 1])


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("BPGPU_BACKEND", "quantum")
    assert bp.MLP([2, 1], backend="numpy").backend.name == "numpy"


@pytest.mark.skipif(bp.gpu_status().usable, reason="this machine has a usable GPU")
def test_cupy_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"backend='cupy' asks for the GPU, but CuPy cannot run here: "):
        bp.MLP([2, 1], backend="cupy")


def test_auto_logs_one_line(caplog):
    backend._auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="bpgpu"):
        backend.resolve("auto")
        backend.resolve("auto")
    lines = [r.getMessage() for r in caplog.records if "bpgpu backend" in r.getMessage()]
    assert len(lines) == 1 and "because" in lines[0] or "usable" in lines[0]


def test_to_numpy_round_trip():
    x = np.arange(3.0)
    assert bp.to_numpy(x) is x


def test_bpgpu_info_prints_versions_and_the_decision(capsys):
    from bpgpu import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"bpgpu {bp.__version__}" in out and f"numpy {np.__version__}" in out
    status = bp.gpu_status()
    assert f"gpu: {'usable' if status.usable else 'not usable'}: {status.reason}" in out
    assert f"backend: {backend.resolve('auto').name} (" in out


def test_unknown_command_is_a_usage_error(capsys):
    from bpgpu import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("upper_only", [False, True])
def test_cholesky_solve_reads_the_triangle_it_is_told_and_refuses_an_indefinite_matrix(dtype, order, upper_only):
    rng = np.random.default_rng(0)
    M = rng.standard_normal((40, 40))
    A = M @ M.T + 40 * np.eye(40)
    B = rng.standard_normal((40, 2))
    want = np.linalg.solve(A, B)
    given = np.array(A, dtype=dtype, order=order)
    if upper_only:
        given[np.tril_indices(40, -1)] = np.nan  # never read
    got = backend.resolve("numpy").cholesky_solve(given, B.astype(dtype), upper_only=upper_only)
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=0)
    assert got.dtype == dtype
    indefinite = np.array(A, order=order)
    indefinite[3, 3] = -1.0
    assert backend.resolve("numpy").cholesky_solve(indefinite, B[:, 0], upper_only=upper_only) is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [7, 1100])  # 1100: more than one block of the mirror
def test_gram_sums_the_chunks_products_with_both_triangles(dtype, n):
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal((k, n)).astype(dtype) for k in (5, 1, 30)]
    want = sum(R.astype(np.float64).T @ R.astype(np.float64) for R in chunks)
    got = backend.resolve("numpy").gram(iter(chunks), n, dtype)
    assert got.dtype == dtype and got.shape == (n, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-12) * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)  # the mirror is exact
