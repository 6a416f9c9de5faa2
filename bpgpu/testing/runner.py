"""Call CuPy kernels on numpy arrays, executing the exact generated source on the CPU.

:class:`HostKernel` wraps an ElementwiseKernel or ReductionKernel and takes the
same call (``k(*args)``, ``k(*args, axis=, keepdims=)``) with numpy arrays.  Calls
happen inside a :class:`HostSession`, which works in two passes so that every
distinct source compiles in one g++ run:

1. ``session.record(fn)`` runs ``fn``: each kernel call is planned (source and
   launch arguments, which depend on shapes, strides and dtypes only) but not run;
2. ``session.compile()`` builds one shared object for all recorded sources;
3. ``session.replay(fn)`` runs ``fn`` again, now executing every call.

A source first met in the replay (control flow that depends on values) is built
on its own then.
"""

from __future__ import annotations

import contextlib

from bpgpu.testing import host, sources

_active = []  # the session kernel calls go to


class HostKernel:
    """A CuPy kernel callable on numpy arrays inside a HostSession."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.name = kernel.name

    def __call__(self, *args, **kwargs):
        if not _active:
            raise RuntimeError(f"{self.name}: HostKernel calls must run inside a HostSession")
        return _active[-1].call(self.kernel, args, kwargs)

    def __repr__(self):
        return f"HostKernel({self.name})"


class HostSession:
    def __init__(self):
        self.launches = {}  # source -> Launch (the first seen: a template for the unit)
        self.units = {}  # source -> (library, index)
        self.executing = False
        self.launched = []  # names of the kernels executed, in order
        self.planned = []  # sources of every call, in order (both passes)

    @contextlib.contextmanager
    def _on(self, executing):
        self.executing = executing
        _active.append(self)
        try:
            yield
        finally:
            _active.pop()

    def record(self, fn, *args, **kwargs):
        with self._on(False):
            return fn(*args, **kwargs)

    def replay(self, fn, *args, **kwargs):
        with self._on(True):
            return fn(*args, **kwargs)

    def compile(self):
        pending = [src for src in self.launches if src not in self.units]
        if pending:
            lib = host.build([self.launches[src] for src in pending])
            for k, src in enumerate(pending):
                self.units[src] = (lib, k)

    def call(self, kernel, args, kwargs):
        launch, outs = sources.plan(kernel, *args, **kwargs)
        self.launches.setdefault(launch.code, launch)
        self.planned.append(launch.code)
        if self.executing:
            if launch.code not in self.units:
                self.compile()
            lib, k = self.units[launch.code]
            host.execute(lib, k, launch)
            self.launched.append(kernel.name)
        if kernel.nout == 1 and not getattr(kernel, "return_tuple", False):
            return outs[0]
        return tuple(outs)
