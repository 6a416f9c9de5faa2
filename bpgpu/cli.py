"""The ``bpgpu`` command: info, bench (the main job) and demo.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when named, so ``bpgpu info``
stays fast and works without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys

SUBCOMMANDS = {
    "info": ("bpgpu.cli", "versions and the backend decision with its reason"),
    "bench": ("bpgpu.bench", "benchmark backprop vs finite differences and a training step"),
    "demo": ("bpgpu.demo", "train an MLPClassifier on the digits data set"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bpgpu info`` takes no options."""


def run(args: argparse.Namespace) -> int:
    """Print versions and which backend "auto" picks, with the reason."""
    import array_api_compat
    import numpy as np

    import bpgpu
    from bpgpu.backend import gpu_status, resolve

    print(f"bpgpu {bpgpu.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"numpy {np.__version__}")
    print(f"array-api-compat {array_api_compat.__version__}")
    try:
        import cupy

        print(f"cupy {cupy.__version__}")
    except Exception as exc:  # not installed, or broken
        print(f"cupy not importable ({type(exc).__name__})")
    status = gpu_status()
    print(f"gpu: {'usable' if status.usable else 'not usable'}: {status.reason}")
    backend = resolve("auto")
    print(f"backend: {backend.name} ({backend.reason})")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpgpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv)  # prints the help or the error, and exits
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"bpgpu {command}", description=SUBCOMMANDS[command][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log the backend decision and more")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
