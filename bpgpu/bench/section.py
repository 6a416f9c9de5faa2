"""What a section of ``bpgpu bench`` is: one experiment, its part of results.json and of each report.

A section is a :class:`Section` value named ``SECTION`` in a module of
:mod:`bpgpu.bench.sections`; the registry there lists them in the order they run
and print. The command line, the progress bar, results.json, results.md, the
terminal table and the plots are assembled from the sections by
:mod:`bpgpu.bench.report` and :mod:`bpgpu.bench.cli`, so a new section touches
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bpgpu.backend import Backend

from .plan import Plan


@dataclass(frozen=True)
class Context:
    """What a section's ``run`` gets.

    backend: the backend the run is about ("auto"'s pick or ``--backend``);
    backends: numpy, plus that backend when it is a GPU one (CPU peers run with numpy);
    peers: the peer implementations installed and wanted (``--no-peers`` empties it);
    tick: call once per unit of work counted by the section's ``tasks``.
    """

    plan: Plan
    backend: Backend
    backends: list[Backend]
    peers: list[str]
    tick: Callable[[str], None]


@dataclass(frozen=True)
class Section:
    """One experiment.

    key: its key in results.json (and the name ``--section`` takes);
    tasks(ctx): how many times ``run`` will call ``ctx.tick`` (for the progress bar);
    run(ctx) -> dict: the measurements, JSON-serializable, stored under ``key``;
    text(result) / markdown(result) -> lines: its part of the terminal table and of
    results.md (say "extrapolated" wherever a figure is not measured);
    plot(result, folder) -> file names written there (optional; matplotlib imported inside).
    """

    key: str
    tasks: Callable[[Context], int]
    run: Callable[[Context], dict]
    text: Callable[[dict], list[str]]
    markdown: Callable[[dict], list[str]]
    plot: Callable[[dict, Path], list[str]] | None = None
