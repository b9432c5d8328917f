"""``python -m dualpath.launch_server``: ``python -m sglang.launch_server`` with DualPath flags.

The convenience form of the stock launch line. It takes every ``sglang.launch_server`` argument plus the
``--dualpath-*`` ones (``--help`` shows both), turns the latter into the DualPath storage backend's
extra-config (merged with the user's own keys), adds the SGLang settings DualPath relies on that the
command line leaves at SGLang's defaults (:data:`dualpath.srt.surface.REQUIRED`; decided from SGLang's own
parse of the command line, so abbreviations and ``--config`` files count), and runs SGLang, whose launch the
plugin then completes (``server.on_launch``). ``--dualpath-off`` runs stock SGLang.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from dualpath.srt import cpu, surface
from dualpath.srt.config import BACKEND, DEFAULT_STORE
from dualpath.srt.server import required

PAGE_TOKENS = 64  # DualPath's page size unless the command line sets one (Full Blocks of 64 tokens)


def dualpath_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("DualPath (written into the storage backend's extra-config)")
    group.add_argument("--dualpath-off", action="store_true", help="run stock SGLang (no DualPath plugin)")
    group.add_argument("--dualpath-node", help="storage NIC (node) this server reads through (default: the host)")
    group.add_argument("--dualpath-store-root", default=str(DEFAULT_STORE), help="block store directory")
    group.add_argument("--dualpath-nic-gbps", type=float, default=None,
                       help="emulated storage-NIC cap of the node in Gb/s (single-host runs); 0 removes it")
    group.add_argument("--dualpath-kv-host", help="routable address of the KV channel (default: $SGLANG_HOST_IP, "
                       "else SGLang's local-IP detection)")
    group.add_argument("--dualpath-kv-port", type=int, default=0, help="KV channel port (0: a free one)")
    group.add_argument("--dualpath-staging-blocks", type=int, default=512, help="block slots of the KV staging area")
    group.add_argument("--dualpath-timeout", type=float, default=10.0, help="KV transfer timeout in seconds")
    group.add_argument("--dualpath-wait-all-layers", action="store_true",
                       help="prefill: wait for every layer a DE forwards before admitting the request (ablation; "
                       "default: the forward of layer i waits for layer i only)")
    group.add_argument("--dualpath-compute-gbps", type=float, default=None,
                       help="emulated compute-NIC cap in Gb/s (single-host runs): SGLang's PD KV transfer at high "
                       "priority, the DE->PE KV at low priority")
    group.add_argument("--dualpath-compute-nic", help="emulated compute NIC shared by the servers naming it "
                       "(default: the node)")
    group.add_argument("--dualpath-kv-ib-sl", type=int, help="InfiniBand service level of the DE->PE KV (the "
                       "fabric's low-priority lane)")
    group.add_argument("--dualpath-kv-dscp", type=int, help="RoCE DSCP of the DE->PE KV (the fabric's low-priority "
                       "traffic class)")
    group.add_argument("--dualpath-prefill-quota-ms", type=float, default=300.0,
                       help="PE compute quota per prefill batch in ms (paper: 300); 0 keeps SGLang's token budgets")
    group.add_argument("--dualpath-cost-model", type=_cost_model, default=(),
                       help="attention cost model BASE_S,PER_TOKEN_S,PER_PAIR_S for the quota (default: fitted to "
                       "the server's own prefill batches)")
    return parser


def _cost_model(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected BASE_S,PER_TOKEN_S,PER_PAIR_S, got {text!r}")
    return values


def sglang_parser(parents: list[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualpath.launch_server", parents=list(parents))
    surface.resolve("add_cli_args")(parser)
    return parser


UNSET = object()


def parse_sglang(argv: list[str], unset: Iterable[str] = ()) -> argparse.Namespace:
    """SGLang's own parse of ``argv`` (``--config`` files merged in, as ``prepare_server_args`` does); the
    fields ``unset`` are :data:`UNSET` unless the command line or its config file sets them."""
    parser = sglang_parser()
    parser.set_defaults(**dict.fromkeys(unset, UNSET))
    if "--config" in argv:
        argv = surface.resolve("config_merger")(parser).merge_config_with_args(argv)
    return parser.parse_args(argv)


def extra_config(args: argparse.Namespace, given: str | None) -> str:
    """The DualPath storage backend's extra-config: the user's own keys, then the DualPath flags'."""
    if given and given.startswith("@"):
        raise ValueError("with an extra-config file (@FILE), put the DualPath keys in the file and launch with "
                         "python -m sglang.launch_server (see docs/deployment.md)")
    settings: dict[str, Any] = {"store_root": args.dualpath_store_root, "kv_port": args.dualpath_kv_port,
                                "staging_blocks": args.dualpath_staging_blocks, "timeout_s": args.dualpath_timeout,
                                "prefill_quota_ms": args.dualpath_prefill_quota_ms,
                                "cost_model": list(args.dualpath_cost_model),
                                "layerwise": not args.dualpath_wait_all_layers}
    optional = {"node": args.dualpath_node, "kv_host": args.dualpath_kv_host, "nic_gbps": args.dualpath_nic_gbps,
                "compute_nic": args.dualpath_compute_nic, "compute_gbps": args.dualpath_compute_gbps,
                "kv_ib_sl": args.dualpath_kv_ib_sl, "kv_dscp": args.dualpath_kv_dscp}
    settings |= {key: value for key, value in optional.items() if value is not None}
    return json.dumps({**(json.loads(given) if given else {}), **BACKEND, **settings})


def forced(argv: list[str], needs: dict[str, tuple[str, object]]) -> list[str]:
    """Flags that set what DualPath ``needs`` where ``argv`` leaves it unset; ``ValueError`` where it chose
    something else."""
    raw, extra = parse_sglang(argv, unset=needs), []
    for field, (flag, needed) in needs.items():
        value = surface.setting(raw, field)
        if value is UNSET:
            extra += [flag] if needed is True else [flag, str(needed)]
        elif value != needed:
            raise ValueError(f"DualPath needs {flag}{'' if needed is True else f' {needed}'}, got {value!r} "
                             "(or pass --dualpath-off)")
    return extra


def sglang_argv(argv: list[str], args: argparse.Namespace) -> list[str]:
    """``argv`` with DualPath's extra-config and the SGLang settings it needs."""
    raw = parse_sglang(argv)
    settings = surface.launch_settings(raw)
    if settings.storage_backend not in (None, "dynamic"):
        raise ValueError(f"DualPath is the storage backend; got --hicache-storage-backend {settings.storage_backend}")
    if settings.dp_attention:  # untested: SGLang 0.5.17 cannot run it on CPU (docs/srt.md, Limits)
        raise ValueError("DualPath does not support --enable-dp-attention in this version; use --tp without it")
    extra = forced(argv, required(raw))
    if settings.page_size is None:
        extra += ["--page-size", str(PAGE_TOKENS)]
    config = extra_config(args, settings.extra_config)
    return argv + extra + ["--hicache-storage-backend", "dynamic", "--hicache-storage-backend-extra-config", config]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        sglang_parser([dualpath_parser()]).print_help()
        return
    args, rest = dualpath_parser().parse_known_args(argv)
    surface.self_check()
    if cpu.needed():  # SGLang on CPU needs the stand-ins whether DualPath is on or off
        cpu.export()
        if args.dualpath_off:
            rest += forced(rest, surface.CPU_REQUIRED)
    if not args.dualpath_off:
        try:
            rest = sglang_argv(rest, args)
        except ValueError as exc:
            raise SystemExit(f"dualpath.launch_server: {exc}") from exc
    surface.resolve("load_plugins")()
    server_args = surface.resolve("prepare_server_args")(rest)
    try:
        surface.resolve("launch_main")(server_args)
    finally:
        surface.resolve("kill_process_tree")(os.getpid(), include_parent=False)
