"""DualPath PD router: an SGLang-router-compatible front door whose global scheduler picks, per request,
the prefill server, the decode server and the side that reads the hit KV from the store."""

from __future__ import annotations

from dualpath.router.app import build_app, run
from dualpath.router.config import PrefillSpec, RouterConfig, parse_args, to_argv

__all__ = ["PrefillSpec", "RouterConfig", "build_app", "parse_args", "run", "to_argv"]
