"""``python -m dualpath.launch_server``: ``python -m sglang.launch_server`` with DualPath.

Takes every ``sglang.launch_server`` argument plus the ``--dualpath-*`` ones below. It adds the SGLang
flags DualPath relies on (HiCache with the DualPath ``dynamic`` storage backend, ``layer_first`` host
pages, the prefetch gate, decode-side radix cache in PD decode) unless the command line already sets
them, refuses settings that contradict them, passes the DualPath configuration to every SGLang process
through the environment, and serves ``GET /dualpath/info`` for the router. ``--dualpath-off`` runs
stock SGLang.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from dualpath.srt import cpu, targets
from dualpath.srt.config import CPU_ENV, ENV, SrtConfig

BACKEND = {"backend_name": "dualpath", "module_path": "dualpath.srt.storage", "class_name": "DualPathStorage",
           "interface_v1": 1}
# flag -> value DualPath needs (None: a switch). A different value given by the user is an error.
REQUIRED = {
    "--enable-hierarchical-cache": None,
    "--hicache-storage-backend": "dynamic",
    "--hicache-mem-layout": "layer_first",
    "--hicache-storage-prefetch-policy": "wait_complete",
}
DEFAULTS: dict[str, str | None] = {"--page-size": "64", "--hicache-storage-backend-extra-config": json.dumps(BACKEND)}
DEFAULT_STORE = Path.home() / ".cache" / "dualpath" / "store"


def dualpath_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("DualPath")
    group.add_argument("--dualpath-off", action="store_true", help="run stock SGLang (no DualPath plugin)")
    group.add_argument("--dualpath-node", default="node0", help="storage NIC (node) this server reads through")
    group.add_argument("--dualpath-store-root", default=str(DEFAULT_STORE), help="block store directory")
    group.add_argument("--dualpath-nic-gbps", type=float, default=None,
                       help="emulated storage-NIC cap of the node in Gb/s (single-host runs); 0 removes it")
    group.add_argument("--dualpath-kv-port", type=int, default=0, help="KV channel port (0: a free one)")
    group.add_argument("--dualpath-staging-blocks", type=int, default=512, help="block slots of the KV staging area")
    group.add_argument("--dualpath-timeout", type=float, default=10.0, help="KV transfer timeout in seconds")
    group.add_argument("--dualpath-prefill-quota-ms", type=float, default=0.0,
                       help="PE compute quota per prefill batch in ms (paper: 300); 0 keeps SGLang's token budgets")
    group.add_argument("--dualpath-cost-model", type=_cost_model, default=(),
                       help="attention cost model BASE_S,PER_TOKEN_S,PER_PAIR_S for the quota (profiled)")
    return parser


def _cost_model(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected BASE_S,PER_TOKEN_S,PER_PAIR_S, got {text!r}")
    return values


def _value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _missing(argv: list[str], flags: dict[str, str | None]) -> list[str]:
    extra: list[str] = []
    for flag, value in flags.items():
        if _value(argv, flag) is None:
            extra += [flag] if value is None else [flag, value]
    return extra


def cpu_argv(argv: list[str]) -> list[str]:
    """SGLang's overlap scheduler records CUDA events, and sgl_kernel's host copies need CUDA."""
    return argv + _missing(argv, {"--disable-overlap-schedule": None, "--hicache-io-backend": "direct"})


def sglang_argv(argv: list[str]) -> list[str]:
    """``argv`` with the flags DualPath needs; ``ValueError`` when the user set one differently."""
    extra: list[str] = []
    for flag, needed in REQUIRED.items():
        given = _value(argv, flag)
        if given is None:
            extra += [flag] if needed is None else [flag, needed]
        elif needed is not None and given != needed:
            raise ValueError(f"DualPath needs {flag} {needed}, got {given!r} (or pass --dualpath-off)")
    extra += _missing(argv, DEFAULTS)
    if _value(argv, "--disaggregation-mode") == "decode":
        extra += _missing(argv, {"--disaggregation-decode-enable-radix-cache": None})
    return argv + extra


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def add_info_route(config: SrtConfig, page_size: int, model: str) -> None:
    app = targets.resolve("http_app")
    info = {"role": config.role, "node": config.node, "kv_endpoint": f"{config.kv_host}:{config.kv_port}",
            "kv_agent": config.kv_agent, "kv_channel": config.kv_channel, "page_size": page_size,
            "store_root": config.store_root, "model": model}

    async def dualpath_info() -> dict[str, object]:
        try:  # published by the scheduler process once SGLang built its host pool
            published = json.loads(Path(config.announcement).read_text())
        except (OSError, ValueError):
            published = {}
        return info | published

    app.add_api_route("/dualpath/info", dualpath_info, methods=["GET"])


def main(argv: list[str] | None = None) -> None:
    args, rest = dualpath_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    on_cpu = cpu.needed()
    if on_cpu:  # SGLang on CPU needs the stand-ins whether DualPath is on or off
        os.environ.update(cpu.environment())
        os.environ[CPU_ENV] = "1"
        rest = cpu_argv(rest)
    if args.dualpath_off:
        os.environ.pop(ENV, None)
    else:
        targets.self_check()
        try:
            rest = sglang_argv(rest)
        except ValueError as exc:
            raise SystemExit(f"dualpath.launch_server: {exc}") from exc
    server_args = targets.resolve("prepare_server_args")(rest)
    if not args.dualpath_off:
        config = SrtConfig(server_args.disaggregation_mode, args.dualpath_node, args.dualpath_store_root,
                           args.dualpath_kv_port or free_port(server_args.host), server_args.host,
                           args.dualpath_nic_gbps, args.dualpath_staging_blocks, args.dualpath_timeout,
                           args.dualpath_prefill_quota_ms, args.dualpath_cost_model)
        os.environ[ENV] = config.to_env()  # inherited by every process SGLang spawns
        add_info_route(config, server_args.page_size, server_args.served_model_name)
    targets.resolve("load_plugins")()
    try:
        targets.resolve("launch_main")(server_args)
    finally:
        targets.resolve("kill_process_tree")(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
