"""Run CuPy-generated kernel source on the CPU: g++ compiles it against CuPy's own headers.

Each planned launch (:class:`bpgpu.testing.sources.Launch`) becomes a unit of one
translation unit: the generated code, wrapped in its own namespace (its ``#include``
lines hoisted to the top and ``extern "C"`` dropped, so kernels of one name can sit
side by side; nothing else is touched), plus a small ``extern "C"`` launcher that
builds the CArray / CIndexer / scalar arguments from the numpy arrays' pointers,
shapes and strides.  ``include/cuda_host.h`` defines the CUDA built-ins;
``include/cuda_fp16.h`` a binary16 half type.  CuPy's header list is included
except ``complex.cuh`` (it needs thrust; no bpgpu kernel is complex).  All launches
of a batch compile at once (one g++ call) and the shared object is cached on disk
by the hash of its source.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from bpgpu.testing import sources

CXX_FLAGS = ("-std=c++20", "-O0", "-shared", "-fPIC", "-pthread", "-w")
_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)


class HostCompileError(RuntimeError):
    """g++ rejected the host build of generated kernel sources."""


def gxx():
    """Path of a C++20 compiler with _Float16 (g++ 12+), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.cache
def cache_dir():
    """Where built objects and NVRTC results are kept: $BPGPU_KERNEL_CACHE, else
    ~/.cache/bpgpu/host-kernels, else (read-only home) the temporary directory."""
    root = os.environ.get("BPGPU_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bpgpu", "host-kernels"
    )
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError:
        root = os.path.join(tempfile.gettempdir(), f"bpgpu-host-kernels-{os.getuid()}")
        Path(root).mkdir(parents=True, exist_ok=True)
    return root


def _include_dirs():
    import cupy

    here = resources.files("bpgpu.testing") / "include"
    return (str(here), os.path.join(os.path.dirname(cupy.__file__), "_core", "include"))


def _split_params(text):
    """Split a C parameter list at top-level commas (template arguments hold commas)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "<"
        depth -= ch == ">"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _launcher(k, launch):
    """C++ for unit k: the generated code in a namespace plus its extern "C" launcher.

    Arguments arrive as ``void** p`` (one pointer per kernel parameter: the array
    data or the scalar's bytes) and ``const ptrdiff_t* meta`` (shape then strides
    of each array, the shape of each indexer)."""
    match = _SIGNATURE.search(launch.code)
    if match is None:
        raise sources.CupyInternalsError(f"{launch.name}: no kernel signature in the generated source")
    name, params = match.group(1), _split_params(match.group(2))
    includes = [line for line in launch.code.splitlines() if line.strip().startswith("#include")]
    body = "\n".join(line for line in launch.code.splitlines() if not line.strip().startswith("#include"))
    body = body.replace('extern "C" __global__', "__global__", 1)
    decls, fields, off = [], [], 0
    for i, (param, arg) in enumerate(zip(params, launch.args)):
        ctype = param.rsplit(None, 1)[0].removeprefix("const ").strip()
        fields.append(f"{ctype} a{i};")
        if ctype.startswith("CArray<"):
            elem = _split_params(ctype[len("CArray<") : -1])[0]
            nd = arg.ndim
            decls.append(f"{ctype}(reinterpret_cast<{elem}*>(p[{i}]), meta + {off}, meta + {off + nd})")
            off += 2 * nd
        elif ctype.startswith("CIndexer<"):
            decls.append(f"{ctype}(meta + {off})")
            off += len(arg)
        else:
            decls.append(f"*reinterpret_cast<const {ctype}*>(p[{i}])")
    ns = f"bpgpu_k{k}"
    call = ", ".join(f"c.a{i}" for i in range(len(fields)))
    return "\n".join(includes), (
        f"namespace {ns} {{\n{body}\n"
        f"struct Args {{ {' '.join(fields)} }};\n"
        f"void body(void* args) {{ Args& c = *static_cast<Args*>(args); {name}({call}); }}\n"
        f"}}  // namespace {ns}\n"
        "#undef REDUCE\n#undef POST_MAP\n#undef _REDUCE\n"
        f'extern "C" void bpgpu_launch_{k}(void** p, const ptrdiff_t* meta) {{\n'
        f"  {ns}::Args args{{{', '.join(decls)}}};\n"
        f"  bpgpu_run({launch.n_blocks}, {launch.block_size}, {ns}::body, &args);\n}}\n"
    )


def _translation_unit(launches):
    includes, units = set(), []
    for k, launch in enumerate(launches):
        inc, unit = _launcher(k, launch)
        includes.update(filter(None, inc.splitlines()))
        units.append(unit)
    # CuPy's header list minus complex.cuh (it needs thrust; no bpgpu kernel is complex).
    headers = [h for h in launches[0].headers() if "complex" not in h] if launches else []
    return "\n".join(['#include "cuda_host.h"', "#define __CUDACC_VER_MAJOR__ 12"] + headers + sorted(includes) + units)


def build(launches):
    """Compile all launches into one shared object (cached by content); returns the CDLL."""
    source = _translation_unit(launches)
    compiler = gxx()
    if compiler is None:
        raise HostCompileError("no C++ compiler (g++ 12+) on PATH; set CXX")
    incs = _include_dirs()
    key = hashlib.sha256("\0".join((source, compiler, *CXX_FLAGS, *incs)).encode()).hexdigest()[:24]
    target = os.path.join(cache_dir(), f"kernels-{key}.so")
    if not os.path.exists(target):
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = os.path.join(tmp, "kernels.cpp")
            Path(src).write_text(source)
            out = os.path.join(tmp, "kernels.so")
            cmd = [compiler, *CXX_FLAGS, *(f"-I{d}" for d in incs), src, "-o", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise HostCompileError(
                    f"g++ rejected the host build of {len(launches)} generated kernel(s):\n"
                    f"{proc.stderr[-6000:]}\n--- source ---\n{sources.numbered(source)}"
                )
            os.replace(out, target)
    return _load(target)


@functools.cache
def _load(path):
    return ctypes.CDLL(path)


def execute(lib, k, launch):
    """Run unit k of ``lib`` on the launch's arrays (written in place)."""
    ptrs, meta, keep = [], [], []
    for arg in launch.args:
        if isinstance(arg, np.ndarray):
            ptrs.append(arg.ctypes.data)
            meta += list(arg.shape) + list(arg.strides)
        elif isinstance(arg, tuple):  # an indexer's shape
            ptrs.append(None)
            meta += list(arg)
        else:
            box = np.array(arg)
            keep.append(box)
            ptrs.append(box.ctypes.data)
    p = (ctypes.c_void_p * len(ptrs))(*ptrs)
    m = np.array(meta or [0], dtype=np.intp)
    fn = getattr(lib, f"bpgpu_launch_{k}")
    fn.restype = None
    fn(p, m.ctypes.data_as(ctypes.c_void_p))
    del keep


def run(launches):
    """Compile (or fetch from the cache) and run every launch, in order."""
    lib = build(launches)
    for k, launch in enumerate(launches):
        execute(lib, k, launch)
