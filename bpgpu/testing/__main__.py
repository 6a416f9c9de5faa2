"""``python -m bpgpu.testing``: check every CuPy kernel without a GPU and print the tables.

Exit status 0 when every generated source compiles and every op matches its numpy
twin, 1 otherwise (the failures are printed in full after the tables).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np

from bpgpu.testing import cases, checks, host, sources


def _versions():
    cupy = sources.require_cupy()
    from cupy.cuda import nvrtc

    major, minor = nvrtc.getVersion()
    gxx = host.gxx()
    gxx_version = (
        subprocess.run([gxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip() if gxx else "missing"
    )
    return f"CuPy {cupy.__version__}, NVRTC {major}.{minor}, g++ {gxx_version}"


def _compile_table(report, dtypes, archs):
    names = sorted({name for name, _, _ in report.compiled})
    header = f"{'kernel':46s}" + "".join(f"{np.dtype(d).name + ' ' + a:>16s}" for d in dtypes for a in archs)
    lines = [header]
    for name in names:
        cells = []
        for d in dtypes:
            for a in archs:
                errs = report.compiled.get((name, np.dtype(d).name, a))
                cells.append("-" if errs is None else ("FAIL" if any(errs) else f"ok ({len(errs)})"))
        lines.append(f"{name:46s}" + "".join(f"{c:>16s}" for c in cells))
    return lines


def _cpu_table(report, dtypes, layouts):
    by = {(r.case.op, np.dtype(r.case.dtype).name, r.case.layout): r for r in report.results}
    ops = list(dict.fromkeys(r.case.op for r in report.results))
    cols = [(np.dtype(d).name, lay) for d in dtypes for lay in layouts]
    lines = [f"{'op':46s}" + "".join(f"{d[-2:] + ' ' + lay:>14s}" for d, lay in cols)]
    for op in ops:
        cells = []
        for d, lay in cols:
            r = by.get((op, d, lay))
            cells.append("" if r is None else (f"{r.error:.1e}" + ("" if r.ok else " !")))
        lines.append(f"{op:46s}" + "".join(f"{c:>14s}" for c in cells))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bpgpu.testing", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype",
        action="append",
        choices=[np.dtype(d).name for d in cases.DTYPES],
        help="only this dtype (repeatable; default: all)",
    )
    parser.add_argument(
        "--arch", action="append", help=f"NVRTC target (repeatable; default: {' '.join(sources.ARCHS)})"
    )
    parser.add_argument(
        "--all-layouts",
        action="store_true",
        help="NVRTC-compile the sources of every layout, not only the contiguous one",
    )
    args = parser.parse_args(argv)
    dtypes = tuple(np.dtype(d).type for d in args.dtype) if args.dtype else cases.DTYPES
    archs = tuple(args.arch) if args.arch else sources.ARCHS
    ok, why = sources.nvrtc_available()
    if not ok:
        print(f"cannot check the kernels: {why}; install bpgpu[kernel-check]", file=sys.stderr)
        return 2
    compile_layouts = cases.LAYOUTS if args.all_layouts else ("random",)
    report = checks.check_all(dtypes, cases.LAYOUTS, archs, compile_layouts)
    tol = ", ".join(f"{k.name} {v:g}" for k, v in checks.TOLERANCE.items())
    print(f"bpgpu kernel checks without a GPU: {_versions()}")
    print(
        f"\n1. NVRTC compiles of the exact generated source (sources per cell; layouts: {', '.join(compile_layouts)})"
    )
    print("\n".join(_compile_table(report, dtypes, archs)))
    print("\n2. CPU run of the generated source vs the array-API reference in float64:")
    print(f"   max |kernel - twin| / max(1, |twin|) per call ('!' = over the tolerance: {tol})")
    print("\n".join(_cpu_table(report, dtypes, cases.LAYOUTS)))
    for op, why in cases.NOT_GENERATED.items():
        print(f"   {op}: not checked here ({why}); GPU tests only")
    failures = [r for r in report.results if not r.ok]
    compile_failures = {k: [e for e in v if e] for k, v in report.compiled.items() if any(v)}
    print(
        f"\n{len(report.results)} CPU runs, {len(failures)} failed; "
        f"{sum(len(v) for v in report.compiled.values())} NVRTC compiles, "
        f"{sum(len(v) for v in compile_failures.values())} failed; "
        f"kernels never run: {report.unexercised or 'none'}; "
        f"{report.seconds['cpu']:.1f} s CPU runs (g++ included), {report.seconds['nvrtc']:.1f} s NVRTC"
    )
    for r in failures:
        print(f"\nFAIL {r.case.id} (kernels {', '.join(r.kernels) or 'none'}): {r.failure}")
    for (name, dtype, arch), errs in compile_failures.items():
        print(f"\nFAIL NVRTC {name} {dtype} {arch}:\n{errs[0]}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
