"""The compiled CPU kernels ahead of time: an extension module built from :mod:`bpgpu.kernels.compiled`.

A new process that runs a kernel through numba pays numba's import and its first dispatch
(which loads all of numba's typing and lowering registries) before any arithmetic: about 0.5 s
of CPU time on this project's machine (benchmarks/NOTES.md, "E5", "E6"), whatever the kernel.
The kernels a default fit and predict call are therefore also compiled ahead of time, by
``numba.pycc``, into ``bpgpu/kernels/_aot.<platform>.so`` when the package is built
(``setup.py``, ``pip install`` / ``pip wheel``), and a process that finds it fresh runs them
with no numba import at all. Everything else (the derivative tools, L-BFGS, Levenberg–Marquardt,
…) still goes through numba's JIT, imported on first use.

:data:`EXPORTS` lists what is compiled: each core kernel of compiled.py (train_step, _activate,
_derive, the loss kernels, the optimizer updates, all_finite) once per dtype (float32, float64)
and per optional argument (train_step's weights None or given). An export has one signature
(C-contiguous arrays of one dtype; scalars converted to the declared int64 / float64 / bool), and
the extension does not check what it is given (numba's unboxing trusts the dtype), so
:mod:`bpgpu.kernels.provider` calls an export only when every array argument is exactly what
that export declares, and numba's dispatcher (the same kernel, JIT-compiled) otherwise. There
is no second definition of any kernel: every export is a call of the compiled.py dispatcher,
compiled into the extension with that dispatcher's own options.

Staleness: the extension records a digest of the sources it was built from (this module,
compiled.py, codes.py, ``bpgpu/kernels/__init__.py``) and of the target CPU (for a ``host``
build, this machine's model and instruction-set flags). At load a different digest means the
extension is not used (:func:`bpgpu.kernels.provider.load`): numba's JIT runs instead, and
``provider.reason`` says why.

    BPGPU_JIT=0        no compiled kernels at all (the array-API table; bpgpu.kernels.jit)
    BPGPU_AOT=0        at run time: numba's JIT only; at build time: no extension built
    BPGPU_AOT_CPU      the build's target CPU: ``host`` (default: this machine's instruction
                       set, for source installs) or ``generic`` (any CPU of the platform, for
                       wheels shared with other machines), or an LLVM CPU name (recorded, like
                       ``host``, with this machine's CPU: used only where it was built)

Rebuild in place (after editing compiled.py): ``python -m bpgpu.kernels.aot build``; ``python -m
bpgpu.kernels.aot status`` says whether the extension is used. This module imports no numba
(nor numpy) until a build needs it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULE = "_aot"  # the extension: bpgpu.kernels._aot
# What the extension is built from: a change in any of these makes it stale.
SOURCES = ("__init__.py", "codes.py", "compiled.py", "aot.py")
_INFO = "build_info"  # the export that answers the digest's words (0..3) and whether it is a host build (4)


class Export:
    """One signature of one kernel of compiled.py.

    kernel: the dispatcher's name in compiled.py; args: its argument types in numba's notation,
    ``F`` standing for the dtype (f4 or f8; arrays must be C-contiguous, ``[::1]``); result:
    the return type (``void``: the kernel's return value, if any, is dropped: the callers use
    the output arrays); nones: trailing optional arguments passed as None (the export takes
    them not at all); suffix: tells the variants of one kernel apart in the export's name.
    """

    def __init__(self, kernel: str, args: str, result: str = "void", nones: int = 0, suffix: str = ""):
        self.kernel, self.result, self.nones, self.suffix = kernel, result, nones, suffix
        self.args = tuple(a.strip() for a in args.split(";"))
        for a in self.args:
            if "[" in a and not a.endswith("::1]"):
                raise ValueError(f"export {kernel}: array argument {a!r} is not C-contiguous ([..., ::1])")

    def name(self, dtype: str) -> str:
        """The export's symbol in the extension, e.g. ``train_step_weighted_f8``."""
        return f"{self.kernel.lstrip('_')}{self.suffix}_{dtype}"

    def signature(self, dtype: str) -> str:
        return f"{self.result}({', '.join(a.replace('F', dtype) for a in self.args)})"

    def arrays(self, dtype: str) -> list[tuple[int, str, int]]:
        """(position, numpy dtype name, ndim) of every array argument."""
        names = {"f4": "float32", "f8": "float64", "i8": "int64"}
        out = []
        for i, a in enumerate(self.args):
            if "[" in a:
                base = a.split("[")[0].replace("F", dtype)
                out.append((i, names[base], a.count(",") + 1))
        return out


_X2 = "F[:, ::1]"
_STEP = f"{_X2}; {_X2}; F[::1]; F[::1]; F[::1]; i8[:, ::1]; i8; b1; f8; i8; f8; f8; F[::1]"
# The kernels the default fit / predict / score reach from Python (found by tracing the calls
# into compiled.py of MLPClassifier / MLPRegressor fits with adam and sgd, with and without sample
# weights, and of bp.fit with adam / sgd / momentum, in both dtypes), plus the rest of the
# table's loss and update kernels. tests/test_aot.py holds this list against a traced fit.
EXPORTS = (
    Export("train_step", _STEP, "f8", nones=1),  # before the weighted one: Kernel tries them in this order
    Export("train_step", _STEP + "; F[::1]", "f8", suffix="_weighted"),
    Export("_activate", f"i8; {_X2}; F[::1]; {_X2}"),
    Export("_derive", f"i8; {_X2}; {_X2}; {_X2}"),
    Export("_loss_sum", f"i8; {_X2}; {_X2}; b1", "f8", nones=1),
    Export("_loss_grad", f"i8; {_X2}; {_X2}; f8; {_X2}"),
    Export("_residual", f"{_X2}; {_X2}; f8; {_X2}"),
    Export("_sgd", "F[::1]; F[::1]; f8"),
    Export("_momentum", "F[::1]; F[::1]; F[::1]; f8; f8; b1"),
    Export("_adam", "F[::1]; F[::1]; F[::1]; F[::1]; f8; f8; f8; f8"),
    Export("_l2", "F[::1]; F[::1]; F[::1]; f8"),
    Export("all_finite", _X2, "b1"),
)
DTYPES = ("f4", "f8")


def extension_path(directory: Path = HERE) -> Path:
    """Where the extension lives: ``<directory>/_aot<EXT_SUFFIX>`` (e.g. ``_aot.cpython-311-x86_64-linux-gnu.so``)."""
    return directory / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _host_tag() -> str:
    """This machine's CPU as a ``host`` build depends on it: the model and instruction-set flags of
    the first processor (Linux's /proc/cpuinfo), else the platform's name for it."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            first = f.read(1 << 14).split(b"\n\n", 1)[0]
    except OSError:
        first = b""
    keys = (b"vendor_id", b"model name", b"flags", b"Features", b"CPU part", b"isa")
    lines = [line for line in first.split(b"\n") if line.split(b":", 1)[0].strip() in keys]
    import platform  # only here: its import is not free

    return (b"\n".join(lines).decode(errors="replace") or platform.processor()) + "\n" + platform.machine()


def digest(host: bool, directory: Path = HERE) -> tuple[int, int, int, int]:
    """The digest the extension records: SHA-256 of :data:`SOURCES` (in ``directory``) and of the
    target (``host``: :func:`_host_tag`), as four signed 64-bit words."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    h.update((_host_tag() if host else "generic").encode())
    raw = h.digest()
    return tuple(int.from_bytes(raw[8 * i : 8 * i + 8], "little", signed=True) for i in range(4))


def recorded(ext: Any) -> tuple[tuple[int, ...], bool]:
    """(the digest the extension records, whether it is a host build)."""
    info = getattr(ext, _INFO)
    return tuple(info(i) for i in range(4)), bool(info(4))


_READ_INFO = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2])\n"
    "info = getattr(importlib.util.module_from_spec(spec), sys.argv[3])\n"
    "print(*(info(i) for i in range(5)))\n"
)


def up_to_date(path: Path, cpu: str) -> bool:
    """Whether the extension at ``path`` was built from these sources for ``cpu`` (a build step skips
    the compiler then). Read in a child process: a build step then copies or replaces the file, which
    must not be mapped into its own process (overwriting a loaded extension crashed it)."""
    if not path.exists():
        return False
    done = subprocess.run([sys.executable, "-c", _READ_INFO, MODULE, str(path), _INFO], capture_output=True, text=True)
    try:
        *words, host = (int(x) for x in done.stdout.split())
    except ValueError:  # not loadable here: rebuilt
        return False
    return (
        done.returncode == 0
        and len(words) == 4
        and bool(host) == (cpu not in ("generic", ""))
        and (tuple(words) == digest(bool(host)))
    )


# --- the build ---------------------------------------------------------------------------------


def _wrapper(dispatcher: Any, export: Export) -> Any:
    """A Python function of the export's arguments that calls ``dispatcher`` with them and the trailing
    Nones: pycc compiles it with the dispatcher as its callee, so the kernel is compiled with its own
    options (numpy's error model, fastmath where compiled.py says so), not pycc's."""
    params = ", ".join(f"a{i}" for i in range(len(export.args)))
    call = ", ".join([f"a{i}" for i in range(len(export.args))] + ["None"] * export.nones)
    body = f"return kernel({call})" if export.result != "void" else f"kernel({call})"
    namespace = {"kernel": dispatcher}
    exec(f"def {export.kernel.lstrip('_')}({params}):\n    {body}\n", namespace)  # noqa: S102
    return namespace[export.kernel.lstrip("_")]


def _info_function(words: tuple[int, ...], host: bool) -> Any:
    """build_info(i): the digest's word i for i = 0..3, 1 for a host build at i = 4."""
    lines = [f"    if i == {i}:\n        return {w}" for i, w in enumerate(words)]
    namespace: dict[str, Any] = {}
    exec("def build_info(i):\n" + "\n".join(lines) + f"\n    return {int(host)}\n", namespace)  # noqa: S102
    return namespace["build_info"]


def _compile(output_dir: str, cpu: str) -> None:
    """Compile the extension into ``output_dir`` (run in a child process by :func:`build`)."""
    from numba.pycc import CC

    compiled = importlib.import_module(f"{__package__}.compiled")
    cc = CC(MODULE)
    cc.output_dir = output_dir
    cc.verbose = False
    host = cpu not in ("generic", "")  # a named CPU's instruction set is this machine's business too
    cc.target_cpu = cpu if cpu != "generic" else ""  # "": LLVM's generic CPU of the platform
    for e in EXPORTS:
        for d in DTYPES:
            cc.export(e.name(d), e.signature(d))(_wrapper(getattr(compiled, e.kernel), e))
    cc.export(_INFO, "i8(i8)")(_info_function(digest(host), host))
    cc.compile()


def build(output_dir: str | os.PathLike | None = None, cpu: str | None = None, quiet: bool = False) -> Path:
    """Compile the extension from compiled.py into ``output_dir`` (default: next to this module) for the
    target ``cpu`` (default: BPGPU_AOT_CPU, else ``host``); returns its path, raises on failure.

    The compiler runs in a child process: with an empty numba cache of its own (pycc links the
    kernels' LLVM IR, which numba's on-disk cache does not keep) and with ``bpgpu.kernels`` imported
    without the package's ``__init__`` (whose dependencies a build environment may lack)."""
    out = Path(output_dir) if output_dir is not None else HERE
    cpu = cpu or os.environ.get("BPGPU_AOT_CPU", "host")
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bpgpu-aot-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        command = [sys.executable, str(Path(__file__).resolve()), "_compile", str(out.resolve()), cpu]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        # the exception's own line (its message may go on below it: numba's hint about compilers)
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]
        raise RuntimeError(f"numba.pycc failed (exit {done.returncode}): {(errors or lines)[-1].strip()}")
    path = extension_path(out)
    if not path.exists():
        raise RuntimeError(f"numba.pycc reported success but wrote no {path.name}")
    return path


def _standalone() -> None:
    """Make ``bpgpu.kernels`` importable without running ``bpgpu/__init__.py`` (a build step runs
    this file as a script, where the package's own dependencies may not be installed)."""
    import types

    root = HERE.parent
    package = types.ModuleType("bpgpu")
    package.__path__ = [str(root)]
    sys.modules.setdefault("bpgpu", package)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # not this folder: kernels' names


def main(argv: list[str] | None = None) -> int:
    """``python -m bpgpu.kernels.aot build [--cpu host|generic]`` or ``status``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bpgpu.kernels.aot", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the extension next to this module (1–3 minutes)")
    b.add_argument("--cpu", default=None, help="host (default, or BPGPU_AOT_CPU) or generic")
    b.add_argument("--output-dir", default=None)
    sub.add_parser("status", help="whether the extension is built, fresh and used")
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.perf_counter()
        path = build(args.output_dir, args.cpu)
        print(f"built {path} in {time.perf_counter() - start:.0f} s")
        return 0
    from bpgpu.kernels import provider  # only here: the runtime side

    ext = provider.load()
    print("used" if ext is not None else f"not used: {provider.reason}")
    return 0 if ext is not None else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_compile"]:
        _standalone()
        __package__ = "bpgpu.kernels"  # noqa: A001  (run as a script: the package it belongs to)
        _compile(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
