"""The stock PD router's command line (sglang-router 0.3.2): its flags, defaults and parsing, version-specific
like every other name of SGLang's that DualPath uses, so kept here. The router imports this module alone (no
torch, no SGLang server)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sglang_router.router_args import RouterArgs


def add_stock_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``python -m sglang_router.launch_router``, with its default and help."""
    RouterArgs.add_cli_args(parser)


def stock_args(args: argparse.Namespace) -> Any:
    """The stock router's ``RouterArgs`` of parsed flags (``--prefill URL none`` and the like read as stock)."""
    return RouterArgs.from_cli_args(args)


def launch_command(config: Any) -> list[str]:
    """``python -m sglang_router.launch_router`` in PD mode on ``config``'s servers, host, port and Prometheus
    address (a ``RouterConfig``; only what the stock router shares with it is passed). The stock router always
    serves its metrics apart, by default on 0.0.0.0:29000: ``config.prometheus_port`` must name the port."""
    if not config.prometheus_port:
        raise ValueError("the stock router needs a Prometheus port of its own (its default, 29000, may be taken)")
    argv = ["--pd-disaggregation"]
    for spec in config.prefill:
        argv += ["--prefill", spec.url, "none" if spec.bootstrap_port is None else str(spec.bootstrap_port)]
    for url in config.decode:
        argv += ["--decode", url]
    return [sys.executable, "-m", "sglang_router.launch_router", *argv, "--host", config.host,
            "--port", str(config.port), "--prometheus-host", config.prometheus_host,
            "--prometheus-port", str(config.prometheus_port)]
