"""Everything of SGLang that DualPath touches: the names it hooks or calls, and the attributes it reads or sets.

SGLang's internals move between releases; a plugin that silently hooks nothing, or reads an attribute that
was renamed, is the worst failure. So every SGLang name is a :data:`TARGETS` entry, every attribute of an
SGLang object an :data:`ATTRIBUTES` entry read through the accessors below (nothing else in DualPath
reaches into SGLang's objects), and :func:`self_check` resolves all of them before any hook is registered,
naming the first one the installed SGLang lacks. Bumping the pinned SGLang means revisiting this module only.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

SGLANG_VERSION = "0.5.17"

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
CONTROLLER = "sglang.srt.managers.cache_controller.HiCacheController"
HOST_POOL = "sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost"
MLA_HOST_POOL = "sglang.srt.mem_cache.pool_host.mla.MLATokenToKVPoolHost"
SERVER_ARGS = "sglang.srt.server_args.ServerArgs"

# name -> dotted path; hooks refer to the names, never to the paths.
TARGETS: dict[str, str] = {
    "hook_registry": "sglang.srt.plugins.hook_registry.HookRegistry",
    "hook_type": "sglang.srt.plugins.hook_registry.HookType",
    # Request arrival (all modes): the request's RouteHint is recorded by rid.
    "add_request": f"{SCHEDULER}._add_request_to_queue",
    # HiCache's decision to prefetch a request's pages beyond its memory from storage (DualPath's early read).
    "storage_prefetch": "sglang.srt.mem_cache.hiradix_cache.HiRadixCache.prefetch_from_storage",
    # Prefill batch selection (the PE compute quota) and running (its cost model's timings).
    "prefill_batch": f"{SCHEDULER}.get_new_batch_prefill",
    "run_batch": f"{SCHEDULER}.run_batch",
    "schedule_batch": "sglang.srt.managers.schedule_batch.ScheduleBatch",
    # Threads and calls in which the storage backend runs on behalf of one request.
    "storage_hit_query": f"{CONTROLLER}._storage_hit_query",
    "page_transfer": f"{CONTROLLER}._page_transfer",
    # A cache flush (/flush_cache) resets the controller; the backend's slot cache goes with the host pool.
    "controller_reset": f"{CONTROLLER}.reset",
    "decode_prefix_match": (
        "sglang.srt.disaggregation.decode_hicache_mixin.DecodeHiCachePreallocMixin._build_decode_prefix_match"
    ),
    # Layer by layer (layers.py): the host pool's per-layer load into the device pool (also a CPU stand-in
    # below), its release of host pages, and the counter the device pool waits on per layer.
    "host_load_layer": f"{HOST_POOL}.load_to_device_per_layer",
    "mla_host_load_layer": f"{MLA_HOST_POOL}.load_to_device_per_layer",
    "host_free": "sglang.srt.mem_cache.pool_host.base.HostKVCache.free",
    # The DRAM HiCache keeps free beside its host pool (a module constant; a CPU stand-in sets it, cpu.py).
    "host_memory_reserve": "sglang.srt.mem_cache.pool_host.base.HICACHE_HOST_MEMORY_RESERVE_BYTES",
    "layer_done_counter": "sglang.srt.managers.cache_controller.LayerDoneCounter",
    # SGLang's own PD KV transfer (NIXL connector), paced on an emulated compute NIC (traffic.py).
    "pd_send": "sglang.srt.disaggregation.nixl.conn.NixlKVManager.send_kvcache",
    "pd_manager": "sglang.srt.disaggregation.nixl.conn.NixlKVManager",
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
    "add_cli_args": f"{SERVER_ARGS}.add_cli_args",
    "config_merger": "sglang.srt.server_args_config_parser.ConfigArgumentMerger",
    # CPU support (hooked only without CUDA).
    "host_backup_all": f"{HOST_POOL}.backup_from_device_all_layer",
    "mla_host_backup_all": f"{MLA_HOST_POOL}.backup_from_device_all_layer",
    "cuda_host_register": "sglang.srt.mem_cache.pool_host.common._cuda_host_register",
    "nixl_agent": "nixl._api.nixl_agent",
    "scheduler_idle": f"{SCHEDULER}.on_idle",
    "group_coordinator_init": "sglang.srt.distributed.parallel_state.GroupCoordinator.__init__",
    "mla_attention_dispatch": "sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry"
                              ".get_handler",
    "attention_forward_method": "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods"
                                ".AttnForwardMethod",
    # Classes whose instances' attributes DualPath reads or sets (ATTRIBUTES).
    "scheduler": SCHEDULER,
    "req": "sglang.srt.managers.schedule_batch.Req",
    "radix_cache": "sglang.srt.mem_cache.hiradix_cache.HiRadixCache",
    "controller": CONTROLLER,
    "prefetch_operation": "sglang.srt.managers.cache_controller.PrefetchOperation",
    "decode_queue": "sglang.srt.disaggregation.decode.DecodePreallocQueue",
    "host_pool": HOST_POOL,
    "device_pool": "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool",
    "mla_host_pool": MLA_HOST_POOL,
    "mla_device_pool": "sglang.srt.mem_cache.memory_pool.MLATokenToKVPool",
    "storage_config": "sglang.srt.mem_cache.hicache_storage.HiCacheStorageConfig",
    "server_args": SERVER_ARGS,
}

# server_args field -> (its flag, the value DualPath needs; True: the switch on).
REQUIRED: dict[str, tuple[str, object]] = {
    "enable_hierarchical_cache": ("--enable-hierarchical-cache", True),
    "hicache_mem_layout": ("--hicache-mem-layout", "layer_first"),
    "hicache_storage_prefetch_policy": ("--hicache-storage-prefetch-policy", "wait_complete"),
}
DECODE_REQUIRED = {"disaggregation_decode_enable_radix_cache": ("--disaggregation-decode-enable-radix-cache", True)}
# What SGLang needs on a machine without CUDA: its overlap scheduler records CUDA events, and sgl_kernel's
# host copies need CUDA.
CPU_REQUIRED = {"disable_overlap_schedule": ("--disable-overlap-schedule", True),
                "hicache_io_backend": ("--hicache-io-backend", "direct")}

# class (a TARGETS name) -> attributes of its instances that DualPath reads or sets.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "scheduler": ("tree_cache", "chunked_req", "waiting_queue", "page_size", "max_prefill_tokens",
                  "chunked_prefill_size"),
    "req": ("rid", "bootstrap_room", "routing_key", "origin_input_ids", "extra_key", "prefix_indices",
            "host_hit_length", "storage_hit_length"),
    "radix_cache": ("cache_controller", "ongoing_prefetch"),
    "controller": ("storage_backend",),
    "prefetch_operation": ("request_id",),
    "decode_queue": ("tree_cache",),
    "host_pool": ("layout", "dtype", "layer_num", "head_num", "head_dim", "page_size", "k_buffer", "v_buffer",
                  "set_from_flat_data_page", "get_data_page", "device_pool"),
    "device_pool": ("k_buffer", "v_buffer", "layer_transfer_counter", "register_layer_transfer_counter"),
    "mla_host_pool": ("layout", "dtype", "layer_num", "kv_lora_rank", "kv_cache_dim", "page_size", "kv_buffer",
                      "set_from_flat_data_page", "get_data_page", "device_pool"),
    "mla_device_pool": ("kv_lora_rank", "kv_buffer", "layer_transfer_counter", "register_layer_transfer_counter"),
    "pd_manager": ("kv_args",),
    "layer_done_counter": ("producer_index", "consumer_index", "wait_until"),
    "schedule_batch": ("forward_mode", "prefix_lens", "extend_lens"),
    "storage_config": ("tp_rank", "tp_size", "pp_size", "model_name"),
    "server_args": ("disaggregation_mode", "tp_size", "hicache_storage_backend", "hicache_storage_backend_extra_config",
                    "served_model_name", "page_size", "host", *REQUIRED, *DECODE_REQUIRED, *CPU_REQUIRED),
}


class HookTargetError(RuntimeError):
    """The installed SGLang lacks a name or attribute DualPath relies on."""


def resolve(name: str) -> Any:
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


def _assigned_in_module(path: str) -> dict[str, frozenset[str]]:
    """Class name -> attributes its methods assign on ``self``, for every class defined in source file ``path``."""
    tree = ast.parse(Path(path).read_text())
    return {node.name: frozenset(target.attr for target in ast.walk(node) if isinstance(target, ast.Attribute)
                                 and isinstance(target.ctx, ast.Store) and isinstance(target.value, ast.Name)
                                 and target.value.id == "self")
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def missing_attributes(cls: type, attributes: Iterable[str],
                       parsed: dict[str, dict[str, frozenset[str]]] | None = None) -> list[str]:
    """Those of ``attributes`` that instances of ``cls`` do not have: neither on the class, nor a dataclass
    field, nor assigned on ``self`` by a method of the class or of its bases (``parsed``: source files read so
    far, by path)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    absent = [a for a in attributes if not hasattr(cls, a) and a not in fields]
    if not absent:
        return []
    parsed = {} if parsed is None else parsed
    for klass in cls.__mro__[:-1]:
        path = getattr(sys.modules.get(klass.__module__), "__file__", None)
        if path and path.endswith(".py"):  # classes without Python source assign nothing here
            if path not in parsed:
                parsed[path] = _assigned_in_module(path)
            assigned = parsed[path].get(klass.__name__, frozenset())
            absent = [a for a in absent if a not in assigned]
    return absent


def self_check(names: Sequence[str] = ()) -> None:
    """Resolve every target (or ``names``) and the attributes DualPath uses of each; raise
    :class:`HookTargetError` on the first that is missing."""
    parsed: dict[str, dict[str, frozenset[str]]] = {}
    for name in names or tuple(TARGETS):
        target = resolve(name)
        missing = missing_attributes(target, ATTRIBUTES.get(name, ()), parsed)
        if missing:
            raise HookTargetError(f"DualPath uses attributes {missing} of {TARGETS[name]}, which the installed "
                                  f"SGLang does not have (DualPath is built against sglang=={SGLANG_VERSION})")


# -- accessors: the only places DualPath reads or sets an attribute of an SGLang object --------------------------
class Arrival(NamedTuple):
    rid: str
    room: int | None  # PD bootstrap room
    routing_key: str | None
    input_ids: list[int]


class QueuedPrefill(NamedTuple):
    key: int
    cached: int  # prompt tokens found in a cache tier (device, host, store)
    new: int


class PoolShape(NamedTuple):
    """A host KV pool's page: ``planes`` per page (layer_first: MHA all K planes, then all V planes; MLA one
    latent plane per layer), each of ``heads x head_dim`` elements per token."""

    layout: str
    dtype: Any  # torch.dtype
    attention: str  # "mha" or "mla"
    layers: int
    heads: int
    head_dim: int  # MLA: kv_lora_rank + qk_rope_head_dim
    page_size: int

    @property
    def planes(self) -> int:
        return self.layers * (2 if self.attention == "mha" else 1)


class StorageSetup(NamedTuple):
    tp_rank: int
    tp_size: int
    pp_size: int
    model_name: str | None
    extra_config: dict[str, Any]


class LaunchSettings(NamedTuple):
    role: str  # disaggregation mode: prefill, decode or null
    tp_size: int
    storage_backend: str | None
    extra_config: str | None
    model: str | None
    page_size: int | None
    host: str
    dp_attention: bool


def arrival(req: Any) -> Arrival:
    return Arrival(req.rid, req.bootstrap_room, req.routing_key, req.origin_input_ids)


def prefetch_issued(radix_cache: Any, rid: str) -> bool:
    """Whether HiCache started a storage prefetch for request ``rid`` (it does not for a prompt whose part beyond
    its memory is short of ``prefetch_threshold``, nor while prefetches in flight fill half its host pool)."""
    return rid in radix_cache.ongoing_prefetch


def set_routing_key(req: Any, key: str | None) -> None:
    req.routing_key = key


def request_id(req: Any) -> str:
    return req.rid


# The request id of the hit queries SGLang makes inline for the request being matched (the decode's prefix match):
# not a request of its own.
INLINE_HIT_QUERY = "__storage_hit_query__"


def operation_request_id(operation: Any) -> str | None:
    """The request a HiCache prefetch operation works for; None for SGLang's inline hit queries, which run on
    behalf of the request the caller is matching."""
    rid = operation.request_id
    return None if rid == INLINE_HIT_QUERY else rid


def storage_backend(owner: Any) -> Any:
    """The HiCache storage backend of a cache controller, or of a scheduler or decode prealloc queue (through
    its HiCache radix cache); None where there is none."""
    tree_cache = getattr(owner, "tree_cache", None)
    controller = owner if tree_cache is None else getattr(tree_cache, "cache_controller", None)
    return getattr(controller, "storage_backend", None)


def queued_prefills(scheduler: Any) -> list[QueuedPrefill]:
    """The requests the next prefill batch is formed from: the chunked one first, then the waiting queue."""
    queue = ([scheduler.chunked_req] if scheduler.chunked_req is not None else []) + list(scheduler.waiting_queue)
    prefills = []
    for req in queue:
        cached = len(req.prefix_indices) + req.host_hit_length + req.storage_hit_length
        prefills.append(QueuedPrefill(id(req), cached, len(req.origin_input_ids) - cached))
    return prefills


def prefill_pairs(batch: Any) -> list[tuple[int, int]]:
    """(cached, new) tokens of each request of a prefill (extend) batch; empty for other batches."""
    if batch is None or batch.forward_mode is None or not batch.forward_mode.is_extend():
        return []
    return list(zip(batch.prefix_lens, batch.extend_lens, strict=True))


def scheduler_page_size(scheduler: Any) -> int:
    return scheduler.page_size


def prefill_budgets(scheduler: Any) -> tuple[int, int | None]:
    """The scheduler's token budgets of one prefill batch: ``max_prefill_tokens`` and ``chunked_prefill_size``."""
    return scheduler.max_prefill_tokens, scheduler.chunked_prefill_size


def set_prefill_budgets(scheduler: Any, budgets: tuple[int, int | None]) -> None:
    scheduler.max_prefill_tokens, scheduler.chunked_prefill_size = budgets


def _is_mla(pool: Any) -> bool:
    return hasattr(pool, "kv_lora_rank")  # MLA pools, host and device; MHA pools have K and V instead


def pool_shape(pool: Any) -> PoolShape:
    """The page shape of an MHA or MLA host KV pool."""
    if _is_mla(pool):
        return PoolShape(pool.layout, pool.dtype, "mla", pool.layer_num, 1, pool.kv_cache_dim, pool.page_size)
    return PoolShape(pool.layout, pool.dtype, "mha", pool.layer_num, pool.head_num, pool.head_dim, pool.page_size)


def layer_buffers(pool: Any, layer: int) -> tuple[Any, ...]:
    """The buffers of ``layer`` in a KV pool (host or device) indexed by token: K and V (MHA), the latent (MLA)."""
    if _is_mla(pool):
        return (pool.kv_buffer[layer],)
    return pool.k_buffer[layer], pool.v_buffer[layer]


def device_pool_of(host_pool: Any) -> Any:
    return host_pool.device_pool


def layer_counter(device_pool: Any) -> Any:
    """What the device pool waits on before a layer's KV is read (SGLang's ``LayerDoneCounter``, or DualPath's gate)."""
    return device_pool.layer_transfer_counter


def load_producer(counter: Any) -> int:
    """The load batch a ``LayerDoneCounter`` is producing (SGLang keeps a few in flight); -1 without one."""
    return -1 if counter is None else counter.producer_index


def load_consumer(counter: Any) -> int:
    """The load batch the running forward consumes; -1 without one."""
    return -1 if counter is None else counter.consumer_index


def set_layer_counter(device_pool: Any, counter: Any) -> None:
    device_pool.register_layer_transfer_counter(counter)


def pd_transfer_bytes(manager: Any, page_indices: Any) -> int:
    """Bytes of one PD KV transfer of SGLang's NIXL connector: a page of every layer buffer per page sent."""
    return len(page_indices) * sum(manager.kv_args.kv_item_lens)


def set_host_page(pool: Any, index: int, flat: Any) -> None:
    pool.set_from_flat_data_page(index, flat)


HELD_PAGES = "dualpath_held_pages"  # DualPath's own attribute on a decode's host pool (held.HeldPages)


def set_host_memory_reserve(reserve_bytes: int) -> None:
    module, _, name = TARGETS["host_memory_reserve"].rpartition(".")
    setattr(importlib.import_module(module), name, reserve_bytes)


def set_held_pages(pool: Any, held: Any) -> None:
    setattr(pool, HELD_PAGES, held)


def held_pages(pool: Any) -> Any:
    return getattr(pool, HELD_PAGES, None)


def host_page(pool: Any, index: int) -> Any:
    """The page at host index ``index``: a strided view of the pool (no copy)."""
    return pool.get_data_page(index, flat=False)


def storage_setup(config: Any) -> StorageSetup:
    return StorageSetup(config.tp_rank, config.tp_size, config.pp_size, config.model_name, config.extra_config or {})


def launch_settings(server_args: Any) -> LaunchSettings:
    """What DualPath reads of SGLang's ``ServerArgs`` (or of the argparse namespace it is built from)."""
    return LaunchSettings(server_args.disaggregation_mode, server_args.tp_size, server_args.hicache_storage_backend,
                          server_args.hicache_storage_backend_extra_config, server_args.served_model_name,
                          server_args.page_size, server_args.host, bool(server_args.enable_dp_attention))


def setting(server_args: Any, field: str) -> object:
    """One of the settings DualPath requires (:data:`REQUIRED` and its kin)."""
    if field not in {*REQUIRED, *DECODE_REQUIRED, *CPU_REQUIRED}:
        raise KeyError(f"{field!r} is not a setting DualPath requires")
    return getattr(server_args, field)
