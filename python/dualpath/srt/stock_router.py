"""The stock PD router's command line (sglang-router 0.3.2): its flags, defaults and parsing, version-specific
like every other name of SGLang's that DualPath uses, so kept here. The router imports this module alone (no
torch, no SGLang server)."""

from __future__ import annotations

import argparse
from typing import Any

from sglang_router.router_args import RouterArgs


def add_stock_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``python -m sglang_router.launch_router``, with its default and help."""
    RouterArgs.add_cli_args(parser)


def stock_args(args: argparse.Namespace) -> Any:
    """The stock router's ``RouterArgs`` of parsed flags (``--prefill URL none`` and the like read as stock)."""
    return RouterArgs.from_cli_args(args)
