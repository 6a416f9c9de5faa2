"""benchmarks/cold_start.py end to end, once (a smoke run: the figures themselves are benchmarks)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("cold_start", ROOT / "benchmarks" / "cold_start.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_cold_start_script_times_each_part_of_the_first_call(capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(ROOT)  # the child processes import this checkout's bpgpu
    script = _script()
    assert script.main(["--runs", "1", "--blas-threads", "1", "--numba-floor"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.split("|")[2:-2]] == list(script.COLUMNS)
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    times = {k: [float(x) for x in cell.split(" / ")] for k, cell in zip(script.COLUMNS, cells)}
    for i in (0, 1):  # wall, cpu: the first call's parts minus the warm fit
        first = sum(times[k][i] for k in script.FIRST_CALL)
        assert times["first_minus_warm"][i] == pytest.approx(first - times["warm_fit"][i], abs=0.004)
    assert all(t >= 0 for k, pair in times.items() if k != "first_minus_warm" for t in pair)
    n0, n1, n2 = (int(n) for n in cells[-1].split(",")[0].split("/"))
    assert min(n0, n1, n2) >= 0
    assert "numba's floor" in out and "median (range)" in out
    assert "numba imported in " in out and "kernels: " in out  # which compiled kernels the fits ran on
