"""A router-only install: the base package's dependencies pull neither torch nor CUDA nor SGLang, and the router
runs without them."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
HEAVY = re.compile(r"^(torch|triton|sglang|nixl.*|nvidia-.*|cuda-.*|flashinfer.*|sgl-kernel|scipy)$")
# What only the servers, the benchmarks and the kernels import (and transformers, which only a router given a
# tokenizer imports).
BLOCKED = ("torch", "triton", "sglang", "nixl", "scipy", "simpy", "matplotlib", "zmq", "rich", "transformers")


def closure(requirements: list[str]) -> set[str]:
    """Names of the distributions ``requirements`` pull, through the installed packages' metadata (no extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):  # not installed here: not followed
            todo += [Requirement(r) for r in metadata.requires(name) or []]
    return seen


def test_the_base_install_pulls_no_torch_cuda_or_sglang() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = closure(project["dependencies"])
    assert {"aiohttp", "sglang-router", "fastapi", "msgspec"} <= base  # the walk follows sglang-router's own
    assert sorted(name for name in base if HEAVY.match(name)) == []
    server = closure(project["optional-dependencies"]["server"])
    assert {"torch", "sglang", "nixl"} <= server  # negative control: the walk finds them where they are


def test_the_router_runs_without_the_server_packages() -> None:
    script = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing any of them fails
from dualpath.router import build_app, parse_args
config = parse_args(["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"])
build_app(config)
sys.argv = ["dualpath.launch_router", "--help"]
import runpy
runpy.run_module("dualpath.launch_router", run_name="__main__")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--pd-disaggregation" in run.stdout and "--dualpath-mode" in run.stdout
    blocked_torch = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                                    "import dualpath.srt.layers"], capture_output=True, text=True, timeout=120)
    assert blocked_torch.returncode != 0 and "torch" in blocked_torch.stderr  # negative control
