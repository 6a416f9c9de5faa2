"""`bpgpu bench` end to end on a tiny plan, and the pieces its numbers rest on."""

import dataclasses
import json

import numpy as np
import pytest

from bpgpu import bench
from bpgpu.backend import resolve
from bpgpu.bench.sections import train_step as train_step_section
from bpgpu.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_json_has_the_schema_runs_are_compared_by(smoke_run):
    _, r = smoke_run
    assert r["backend"] == resolve("auto").name and r["device"]
    assert {"date", "command", "machine", "mode"} <= r.keys() and r["mode"] == "smoke"
    g = r["gradient_cost"]
    assert set(g["exponents"]) == {"backprop", "central_difference", "forward_difference"}
    assert all(np.isfinite(k) for k in g["exponents"].values())
    lo, hi = g["fit_range"]
    assert isinstance(lo, int) and isinstance(hi, int) and 0 < lo < hi
    assert all(p["backprop"] > 0 for p in g["points"])
    # finite differences cost far more than backprop at the same W (2W loss passes against about
    # three, so ~70x at W = 100): the geometric mean over the timed points, so one point
    # disturbed by a burst of load on a shared machine does not decide it
    timed = [p for p in g["points"] if p.get("central_difference")]
    ratios = [p["central_difference"] / p["backprop"] for p in timed]
    assert timed and float(np.exp(np.mean(np.log(ratios)))) > 10, ratios
    rows = r["train_step"]["rows"]
    assert {(row["config"], row["impl"]) for row in rows} == {
        (c, i) for c in ("tiny", "small") for i in ("bpgpu", "numpy_reference")
    }
    for row in rows:
        assert row["seconds"] > 0 and row["gemm_gflops"] > 0 and row["ratio_to_gemm"] > 0
        assert row["gflops"] == pytest.approx(bench.step_flops(row["layer_sizes"], row["batch"]) / row["seconds"] / 1e9)
    assert all(row["ratio_to_bpgpu"] == 1.0 for row in rows if row["impl"] == "bpgpu")
    assert len(r["train_step"]["memory"]) == 2


def test_markdown_report_names_machine_command_and_every_row(smoke_run):
    out, r = smoke_run
    text = (out / "results.md").read_text()
    assert r["command"] in text and r["machine"]["processor"] in text
    assert text.count("| numpy | bpgpu |") == 2 and "forward difference" in text


def test_plots_are_written_as_png(smoke_run):
    out, _ = smoke_run
    for name in ("gradient_cost.png", "train_step.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_power_law_fit_recovers_the_exponent():
    W = np.array([1e3, 1e4, 1e5])
    fit = bench.fit_power_law(W, 3e-9 * W**2)
    assert fit["exponent"] == pytest.approx(2.0) and fit["prefactor"] == pytest.approx(3e-9)
    assert fit["fit_range"] == [1000, 100000]


def test_step_flops_counts_three_gemms_per_layer_but_the_first():
    assert bench.step_flops([4, 3, 2], 5) == 2 * 5 * 4 * 3 * 2 + 2 * 5 * 3 * 2 * 3


def test_extrapolation_scales_the_last_measured_point_by_loss_evaluations():
    points = [
        {"W": 100, "loss_pass": 1e-5, "backprop": 1e-5, "central_difference": 4e-3, "forward_difference": 2e-3},
        {"W": 1000, "loss_pass": 1e-4, "backprop": 1e-4},
    ]
    (row,) = bench.extrapolate_differences(points)
    # measured 4e-3 s for 200 evaluations of 1e-5 s: 2x overhead, kept at W = 1000
    assert row["W"] == 1000
    assert row["central_difference"] == pytest.approx(2 * 2000 * 1e-4)
    assert row["forward_difference"] == pytest.approx(2 * 1000 * 1e-4)


def test_allocation_probe_sees_temporaries_and_in_place_work():
    backend = resolve("numpy")
    a, out = np.ones(100_000), np.empty(100_000)
    allocating = bench.bytes_allocated_per_step(bench.Case(lambda: a * 2.0), backend)
    in_place = bench.bytes_allocated_per_step(bench.Case(lambda: np.multiply(a, 2.0, out=out)), backend)
    assert allocating["peak"] >= a.nbytes
    assert in_place["peak"] < 1000 and in_place["retained"] == 0


def test_an_unknown_backend_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "--smoke", "--backend", "tpu", "--out", str(tmp_path)]) == 2
    assert "'tpu' is not a backend" in capsys.readouterr().err


def test_unknown_mode_and_implementation_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        bench.plan_for("slow")
    with pytest.raises(ValueError, match="impl"):
        bench.step_case("tensorflow", [2, 1], 1, "float32", resolve("numpy"))


def test_interleaved_rounds_shuffle_the_order_and_time_every_case():
    log = []
    cases = {name: bench.Case(lambda name=name: log.append(name)) for name in "abcd"}
    stats = bench.interleaved_timings(cases, min_time=1e-9, repeats=6, settle=0.0, seed=1)
    assert set(stats) == set("abcd") and all(s["calls"] == 6 for s in stats.values())
    rounds = [tuple(log[8 + 4 * r : 12 + 4 * r]) for r in range(6)]  # after 2 untimed calls per case
    assert all(sorted(r) == list("abcd") for r in rounds)  # each case once per round
    assert len(set(rounds)) > 1  # and not always in the same order


def test_a_step_that_compiles_on_its_first_call_is_timed_warm(monkeypatch):
    """A first call that compiles (numba, XLA) for longer than interleaved_timings' long_call
    must not become the step's time (it did once: tiny showed 6.75 s after a cold numba cache)."""
    import time

    real = bench.step_case

    def compiling(*args):
        case, first = real(*args), [True]

        def fn():
            if first[0]:
                first[0] = False
                time.sleep(1.05)
            return case.fn()

        return bench.Case(fn, case.finish)

    monkeypatch.setattr(train_step_section, "step_case", compiling)
    plan = dataclasses.replace(bench.plan_for("smoke"), configs=("tiny",))
    rows = bench.train_step_rows([resolve("numpy")], plan, tick=lambda message: None)["rows"]
    assert rows and all(r["seconds"] < 0.5 for r in rows), [(r["impl"], r["seconds"]) for r in rows]


def test_quick_plan_fits_its_exponents_over_a_range_where_all_three_methods_were_measured():
    """The quick plan's gradient-cost part, cut to W <= 10^2.2 and one round: the headline
    exponents come from points where backprop and both differences were timed (nothing
    extrapolated inside the range), over several points, each with its R²."""
    quick = bench.plan_for("quick")
    grid = tuple(e for e in quick.gradient_log10_W if e <= 2.2)
    plan = dataclasses.replace(quick, gradient_log10_W=grid, fd_max_log10_W=grid[-1], fd_rounds=1, min_time_s=0.05)
    g = bench.gradient_cost(resolve("numpy"), plan, tick=lambda message: None)
    assert g["fit_range_is_common"]
    lo, hi = g["fit_range"]
    inside = [p for p in g["points"] if lo <= p["W"] <= hi]
    assert len(inside) >= 3 and g["common_fit_points"] == len(inside)
    assert all(p[m] is not None and p[m] > 0 for p in inside for m in bench.METHODS)
    assert not [row for row in g["extrapolated"] if row["W"] <= hi]
    assert set(g["r2"]) == set(bench.METHODS) and all(r2 <= 1.0 for r2 in g["r2"].values())
    # each method's own proportional range contains the common one
    assert all(f["fit_range"][0] <= lo and hi <= f["fit_range"][1] for f in g["fits"].values())


def test_a_range_not_measured_by_every_method_is_not_called_common():
    """Backprop timed at four W, finite differences only at the first two (the budget ran
    out): the fit must not claim a common range past W = 200."""
    W = [100, 200, 400, 800]
    points = [{"W": w, "loss_pass": 1e-6 * w, "backprop": 2e-6 * w} for w in W]
    for p in points[:2]:
        p["central_difference"], p["forward_difference"] = 2e-6 * p["W"] ** 2, 1e-6 * p["W"] ** 2
    floors = dict.fromkeys(bench.METHODS, 1e-6)
    g = bench.fit_gradient_cost(points, floors)
    assert g["fit_range"] == [100, 200] and g["common_fit_points"] == 2
    assert g["exponents"]["backprop"] == pytest.approx(1.0) and g["exponents"]["central_difference"] == pytest.approx(
        2.0
    )
    assert [row["W"] for row in g["extrapolated"]] == [400, 800]


def test_the_cpu_is_named_with_its_family_and_vector_extensions(tmp_path):
    """bench.machine.cpu_model: the first CPU's model name, family, model, stepping and the vector
    extensions that pick the GEMM kernels, so that runs on two generations named alike differ."""
    from bpgpu.bench.machine import cpu_model

    info = tmp_path / "cpuinfo"
    first = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nstepping\t: 1\n"
    info.write_text(first + "flags\t\t: fpu sse2 avx2 fma avx512f\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_model(str(info)) == "AMD EPYC (cpu family 25, model 17, stepping 1; avx2, fma, avx512f)"
    info.write_text("model name\t: Some CPU\n")
    assert cpu_model(str(info)) == "Some CPU"
    assert cpu_model(str(tmp_path / "missing"))  # no /proc/cpuinfo: platform.processor() or "unknown"
