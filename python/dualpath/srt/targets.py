"""Every SGLang name DualPath touches, in one table, checked at start-up.

SGLang's internals move between releases; a plugin that silently hooks nothing is the worst failure, so
:func:`self_check` resolves every target before any hook is registered and names the first one that the
installed SGLang does not have. Bumping the pinned SGLang means revisiting this table only.
"""

from __future__ import annotations

import pkgutil

SGLANG_VERSION = "0.5.17"

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
CONTROLLER = "sglang.srt.managers.cache_controller.HiCacheController"
HOST_POOL = "sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost"

# name -> dotted path; hooks refer to the names, never to the paths.
TARGETS: dict[str, str] = {
    # Request arrival (all modes): the request's RouteHint is recorded by rid.
    "add_request": f"{SCHEDULER}._add_request_to_queue",
    # Prefill batch selection (the PE compute quota).
    "prefill_batch": f"{SCHEDULER}.get_new_batch_prefill",
    # Threads and calls in which the storage backend runs on behalf of one request.
    "storage_hit_query": f"{CONTROLLER}._storage_hit_query",
    "page_transfer": f"{CONTROLLER}._page_transfer",
    # A cache flush (/flush_cache) resets the controller; the backend's slot cache goes with the host pool.
    "controller_reset": f"{CONTROLLER}.reset",
    "decode_prefix_match": (
        "sglang.srt.disaggregation.decode_hicache_mixin.DecodeHiCachePreallocMixin._build_decode_prefix_match"
    ),
    # The base class the `dynamic` backend loader requires.
    "storage_base": "sglang.srt.mem_cache.hicache_storage.HiCacheStorage",
    # The server's main process: its HTTP app (GET /dualpath/info) and launch (DualPath decided from server_args).
    "http_app": "sglang.srt.entrypoints.http_server.app",
    "http_launch": "sglang.srt.entrypoints.http_server.launch_server",
    "parse_extra_config": "sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller.HybridCacheController"
                          ".parse_storage_backend_extra_config",
    "local_ip": "sglang.srt.utils.network.get_local_ip_auto",
    # What SGLang's storage-metrics collector takes from get_stats() (with --enable-metrics).
    "storage_metrics": "sglang.srt.observability.metrics_collector.StorageMetrics",
    # python -m dualpath.launch_server.
    "launch_main": "sglang.launch_server.run_server",
    "load_plugins": "sglang.srt.plugins.load_plugins",
    "kill_process_tree": "sglang.srt.utils.kill_process_tree",
    "prepare_server_args": "sglang.srt.server_args.prepare_server_args",
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "config_merger": "sglang.srt.server_args_config_parser.ConfigArgumentMerger",
    # CPU support (hooked only without CUDA).
    "host_load_layer": f"{HOST_POOL}.load_to_device_per_layer",
    "host_backup_all": f"{HOST_POOL}.backup_from_device_all_layer",
    "cuda_host_register": "sglang.srt.mem_cache.pool_host.common._cuda_host_register",
    "nixl_agent": "nixl._api.nixl_agent",
    "scheduler_idle": f"{SCHEDULER}.on_idle",
}


class HookTargetError(RuntimeError):
    """The installed SGLang lacks a name DualPath hooks."""


def resolve(name: str) -> object:
    """The object behind target ``name``, or :class:`HookTargetError` naming it and its dotted path."""
    try:
        path = TARGETS[name]
    except KeyError:
        raise HookTargetError(f"unknown DualPath hook target {name!r}") from None
    try:
        return pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise HookTargetError(
            f"DualPath hook target {name!r} = {path!r} does not resolve in the installed SGLang "
            f"(DualPath is built against sglang=={SGLANG_VERSION}): {exc}"
        ) from exc


def self_check(names: list[str] | None = None) -> None:
    """Resolve every target (or ``names``); raise :class:`HookTargetError` on the first that is missing."""
    for name in names or list(TARGETS):
        resolve(name)
