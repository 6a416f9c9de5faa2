"""The build step that compiles bpgpu's CPU kernels ahead of time (everything else is in pyproject.toml).

``pip install .``, ``pip install -e .`` (PEP 660: the extension lands in the source tree) and
``pip wheel .`` build ``bpgpu/kernels/_aot.<platform>.so`` from ``bpgpu/kernels/compiled.py``
with numba.pycc (:mod:`bpgpu.kernels.aot`), so that a new process fits and predicts without
importing numba. The step never fails the install: any error is one warning line, and bpgpu
then runs the same kernels through numba's JIT.

    BPGPU_AOT=0               skip the step (the JIT only)
    BPGPU_AOT_CPU=generic     compile for any CPU of the platform (wheels for other machines);
                              the default, ``host``, uses this machine's instruction set
"""

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _aot():
    """bpgpu/kernels/aot.py, loaded by path: importing the package would run bpgpu/__init__.py,
    whose dependencies the build environment does not have."""
    spec = importlib.util.spec_from_file_location("_bpgpu_aot_build", ROOT / "bpgpu" / "kernels" / "aot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildAot(build_ext):
    """build_ext whose one extension is compiled by numba.pycc, and whose failure is a warning."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        if os.environ.get("BPGPU_AOT", "1") == "0":
            print("bpgpu: BPGPU_AOT=0: kernels not compiled ahead of time (numba's JIT at run time)", file=sys.stderr)
            return
        start = time.perf_counter()
        try:
            aot = _aot()
            cpu = os.environ.get("BPGPU_AOT_CPU", "host")
            # An extension already built from these sources for this target (in the source tree: the last
            # editable install, or `python -m bpgpu.kernels.aot build`) is copied, not compiled again
            # (2–4 minutes): setuptools builds even an editable install's extension in a temporary folder.
            for built in (target, aot.extension_path(ROOT / "bpgpu" / "kernels")):
                if aot.up_to_date(built, cpu):
                    if built != target:  # by a new file renamed over the old: a process may have it loaded
                        target.parent.mkdir(parents=True, exist_ok=True)
                        part = target.with_name(target.name + ".part")
                        shutil.copy2(built, part)
                        os.replace(part, target)
                    print(f"bpgpu: {built} is up to date with the kernels' sources: not compiled again")
                    return
            built = aot.build(target.parent, cpu)
            if built.name != target.name:  # the same EXT_SUFFIX in both: pycc names it as setuptools does
                built.replace(target)
        except Exception as exc:  # noqa: BLE001  (the install goes on: the JIT runs the same kernels)
            message = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            print(
                f"WARNING: bpgpu: kernels not compiled ahead of time ({message[0]}); numba's JIT will run them",
                file=sys.stderr,
            )
            return
        print(f"bpgpu: compiled the CPU kernels ahead of time into {target} ({time.perf_counter() - start:.0f} s)")

    def get_outputs(self):
        # only what was built: a skipped or failed step leaves no file for the wheel or the editable map
        return [path for path in super().get_outputs() if os.path.exists(path)]


setup(
    ext_modules=[Extension("bpgpu.kernels._aot", sources=[], optional=True)],
    cmdclass={"build_ext": BuildAot},
)
