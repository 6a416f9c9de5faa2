"""``bpgpu bench``: the project's main job, and the measurement code of benchmarks/.

A run is a list of *sections*, each one experiment with its part of
results.json, results.md, the terminal table and the plots. Today:

1. ``gradient_cost`` (:mod:`.sections.gradient_cost`): backprop O(W) against
   central and forward differences O(W²), exponents fitted over a W range where
   all three are measured;
2. ``train_step`` (:mod:`.sections.train_step`): one training step against the
   same-run GEMM, a plain numpy step and the installed peers, and bytes per step.

Adding a section (derivative tools against JAX / torch.func, LM against
torch-levenberg-marquardt, ...):

- write ``bpgpu/bench/sections/<key>.py`` ending in
  ``SECTION = Section(key, tasks, run, text, markdown, plot)``
  (:class:`~bpgpu.bench.section.Section`): ``run(ctx)`` measures and returns a
  JSON-serializable dict stored under ``results[key]``; ``text`` / ``markdown``
  turn that dict into lines (say "extrapolated" wherever a figure is not
  measured); ``plot`` writes PNGs (optional);
- time with :func:`~bpgpu.bench.timing.interleaved_timings` (every case of a
  comparison takes turns in shuffled rounds; the best round counts), build peer
  cases next to :mod:`.peers`, format with :mod:`.report`'s helpers;
- add it to ``SECTIONS`` in :mod:`bpgpu.bench.sections`, and any per-mode
  settings as defaulted fields of :class:`~bpgpu.bench.plan.Plan`;
- ``bpgpu bench --smoke --section <key>`` runs it alone; tests/test_bench.py runs
  the smoke plan end to end.

Modules: :mod:`.timing` (the harness), :mod:`.configs` (training-step nets and
flops), :mod:`.cases` (bpgpu's cases, the plain numpy step, the GEMM),
:mod:`.peers` (PyTorch, JAX, scikit-learn), :mod:`.memory` (bytes per step),
:mod:`.fits` (power-law fits, extrapolation), :mod:`.plan` (full, quick,
smoke), :mod:`.machine`, :mod:`.report`, :mod:`.section`, :mod:`.cli` (the
command's options and run). benchmarks/ imports the builders and timers
below, so ``pytest benchmarks/`` and ``bpgpu bench`` measure the same code.
Heavy imports (matplotlib, tqdm, torch, jax, sklearn) happen inside functions.
"""

from __future__ import annotations

from .cases import (
    IMPLEMENTATIONS,
    available_backends,
    batch,
    bpgpu_jit_case,
    bpgpu_numpy_path_case,
    bpgpu_step_case,
    gemm_case,
    implementations,
    numpy_reference_case,
    step_case,
    step_net,
)
from .cli import add_arguments, run
from .configs import CONFIGS, LEARNING_RATE, STEP_NET, largest_layer, step_flops
from .fits import (
    METHODS,
    OVERHEAD_FACTOR,
    PASSES,
    extrapolate_differences,
    fit_gradient_cost,
    fit_power_law,
    proportional_points,
)
from .machine import machine_info
from .memory import bytes_allocated_per_step
from .peers import (
    PEER_MODULES,
    available_peers,
    jax_case,
    peer_device,
    sklearn_case,
    torch_case,
)
from .plan import NetFamily, Plan, plan_for
from .report import duration, md_table
from .section import Context, Section
from .sections import SECTIONS
from .sections.gradient_cost import (
    backprop_case,
    describe_nets,
    finite_difference_case,
    gradient_cost,
    gradient_net,
    loss_case,
    plan_net,
)
from .sections.train_step import add_ratios, step_row, train_step_rows
from .timing import (
    CLOCKS,
    Case,
    burst,
    interleaved_timings,
    seconds_per_call,
    sync_scalar,
)

__all__ = [
    "CLOCKS",
    "CONFIGS",
    "IMPLEMENTATIONS",
    "LEARNING_RATE",
    "METHODS",
    "OVERHEAD_FACTOR",
    "PASSES",
    "PEER_MODULES",
    "SECTIONS",
    "STEP_NET",
    "Case",
    "Context",
    "NetFamily",
    "Plan",
    "Section",
    "add_arguments",
    "add_ratios",
    "available_backends",
    "available_peers",
    "backprop_case",
    "batch",
    "bpgpu_jit_case",
    "bpgpu_numpy_path_case",
    "bpgpu_step_case",
    "burst",
    "bytes_allocated_per_step",
    "describe_nets",
    "duration",
    "extrapolate_differences",
    "finite_difference_case",
    "fit_gradient_cost",
    "fit_power_law",
    "gemm_case",
    "gradient_cost",
    "gradient_net",
    "implementations",
    "interleaved_timings",
    "jax_case",
    "largest_layer",
    "loss_case",
    "machine_info",
    "md_table",
    "numpy_reference_case",
    "peer_device",
    "plan_for",
    "plan_net",
    "proportional_points",
    "run",
    "seconds_per_call",
    "sklearn_case",
    "step_case",
    "step_flops",
    "step_net",
    "step_row",
    "sync_scalar",
    "torch_case",
    "train_step_rows",
]
