"""``bpgpu bench``'s options and run: the plan, the backends, the sections, the reports."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

from bpgpu.backend import gpu_status, resolve

from . import report
from .machine import cpu_model, load_average, machine_info
from .peers import available_peers
from .plan import plan_for
from .section import Context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .sections import SECTIONS

    parser.add_argument("--quick", action="store_true", help="the short run (about 2 minutes on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds of tiny work (for tests)")
    parser.add_argument("--out", default="bench-out", help="directory for results.json and the plots")
    parser.add_argument("--backend", default="auto", help="auto (default), numpy or cupy")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch, JAX and scikit-learn")
    parser.add_argument("--no-plots", action="store_true", help="write results.json only")
    parser.add_argument(
        "--section",
        action="append",
        choices=list(SECTIONS),
        metavar="NAME",
        help=f"run only this section (repeatable; default all: {', '.join(SECTIONS)})",
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .sections import SECTIONS

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = plan_for(mode)
    if args.no_peers:
        plan = dataclasses.replace(plan, peers=False)
    try:
        backend = resolve(args.backend)
    except (RuntimeError, ValueError) as exc:
        print(f"bpgpu bench: {exc}", file=sys.stderr)
        return 2
    backends = [backend] if backend.name == "numpy" else [resolve("numpy"), backend]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [SECTIONS[key] for key in (args.section or plan.sections or SECTIONS)]

    # No tqdm monitor thread: tracemalloc counts every thread's Python allocations, and the
    # monitor waking up inside the large steps' memory probe showed up as 2 KB "per step".
    tqdm.monitor_interval = 0
    bar = tqdm(desc=f"bpgpu bench ({mode})", unit="task")

    def tick(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    ctx = Context(plan, backend, backends, available_peers() if plan.peers else [], tick)
    bar.total = sum(section.tasks(ctx) for section in sections)
    started = time.perf_counter()
    load_before = load_average()
    results = {
        "backend": backend.name,
        "device": cpu_model() if backend.device == "cpu" else f"{backend.device} ({gpu_status().reason})",
        "backend_reason": backend.reason,
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bpgpu"] + sys.argv[1:]) if Path(sys.argv[0]).name == "bpgpu" else " ".join(sys.argv),
    }
    for section in sections:
        results[section.key] = section.run(ctx)
    bar.close()
    results["machine"] = {**machine_info(backend), "load_average_before": load_before}
    results["seconds"] = time.perf_counter() - started
    files = report.write(results, out, with_plots=not args.no_plots)
    print(report.text(results))
    print(f"\nwrote {', '.join(str(out / f) for f in files)} in {results['seconds']:.0f} s")
    return 0
