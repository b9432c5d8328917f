"""`dualpath` command line: one subcommand per concern, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# Each module defines `register(subparsers)`, which adds its subcommand(s) with `set_defaults(run=...)`.
# Modules are imported lazily-enough: only their `register` runs at start-up.
SUBCOMMAND_MODULES = (
    "dualpath.sim.cli",
    "dualpath.cluster.cli",
    "dualpath.cluster.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualpath", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # a router-only install
        raise SystemExit(f"dualpath: {exc.name} is not installed; the dualpath command needs "
                         "pip install 'sglang-dualpath[server,bench]' (the router alone: "
                         "python -m dualpath.launch_router)") from None
    args = parser.parse_args(argv)
    args.command_line = "dualpath " + shlex.join(argv)  # what a results record says produced it
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
