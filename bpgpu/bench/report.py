"""The reports of a run: results.json, results.md, the terminal table and the plots.

Each section formats its own part (:class:`bpgpu.bench.section.Section`); this
module writes the machine and command header, joins the parts in the registry's
order and holds the formatting helpers the sections share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def duration(seconds: float) -> str:
    """A time in the unit that suits it: 35.2us, 4.10ms, 12.3s, 3.4h."""
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if seconds < 1000 * scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds / 3600:.3g}h"


def optional(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    """A Markdown table; ``align`` per column: "" (default) or "r" (right)."""
    rule = ["---:" if a == "r" else "---" for a in (align or [""] * len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def load_text(load: dict | None) -> str:
    """'1-minute load average 0.8 before, 2.1 after' from {"before": [...], "after": [...]}."""
    if not load or not load.get("before") or not load.get("after"):
        return "1-minute load average not available"
    return f"1-minute load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after"


def _sections():
    from .sections import SECTIONS

    return [s for s in SECTIONS.values()]


def text(results: dict) -> str:
    """The text table ``bpgpu bench`` prints."""
    load = results.get("machine", {}).get("load_average")
    lines = [
        f"backend {results['backend']} on {results['device']}"
        + (f" (1-minute load average {load[0]:.1f} on {os.cpu_count()} CPUs at the end)" if load else "")
    ]
    for section in _sections():
        if section.key in results:
            lines += [""] + section.text(results[section.key])
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """results.md: the run's tables in Markdown, with machine, date and command."""
    machine = results["machine"]
    load = machine.get("load_average")
    lines = [
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs"
        + (f", BLAS {'; '.join(machine['blas'])}" if machine.get("blas") else "")
        + f"; backend {results['backend']} ({results['device']}); numpy {machine['numpy']}"
        + "".join(f", {k} {machine[k]}" for k in ("torch", "jax", "sklearn", "cupy") if k in machine)
        + (f"; 1-minute load average {load[0]:.1f} at the end (shared machine)" if load else ""),
        f"Date: {results['date']}. Command: `{results['command']}` ({results['seconds']:.0f} s).",
    ]
    for section in _sections():
        if section.key in results:
            lines += [""] + section.markdown(results[section.key])
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    """Every section's plots, written into ``out``; returns the file names."""
    files = []
    for section in _sections():
        if section.plot is not None and section.key in results:
            files += section.plot(results[section.key], out)
    return files


def write(results: dict, out: Path, with_plots: bool = True) -> list[str]:
    """results.json, results.md and (``with_plots``) the plots into ``out``; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return ["results.json", "results.md"] + (plots(results, out) if with_plots else [])
