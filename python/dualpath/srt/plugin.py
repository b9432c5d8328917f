"""The ``sglang.srt.plugins`` entry point: DualPath's hooks, in every SGLang process.

In a server's main process the plugin hooks SGLang's launch (``server.on_launch``), which decides from the
parsed arguments whether the server runs DualPath (its storage backend's extra-config names it) and, if so,
hands the configuration to the processes SGLang spawns. SGLang calls ``load_plugins()`` in each of them, so
the hooks registered here apply where the scheduler runs:
- ``$DUALPATH_SRT_CONFIG``: DualPath itself;
- ``$DUALPATH_CPU_SUPPORT=1``: the CPU stand-ins (also set by ``dualpath.launch_server --dualpath-off``;
  never with CUDA).
A server whose storage backend is not DualPath stays stock.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

from dualpath.scheduler.batcher import AttentionCostModel
from dualpath.srt import cpu, held, layers, requests, surface, traffic
from dualpath.srt.batching import BatchTimer, CostProfile, QuotaHook
from dualpath.srt.config import CPU_ENV, SrtConfig

log = logging.getLogger(__name__)

# Hooks of every DualPath server: (target name, AROUND hook).
REQUEST_HOOKS = (
    ("add_request", requests.on_add_request),
    ("storage_prefetch", requests.on_prefetch),
    ("storage_hit_query", requests.on_operation),
    ("page_transfer", requests.on_operation),
    ("decode_prefix_match", requests.on_prefix_match),
)
# Hooks of a prefill that takes the DE's KV layer by layer (layers.py).
LAYER_HOOKS = (
    ("host_load_layer", layers.on_load),
    ("mla_host_load_layer", layers.on_load),
    ("host_free", layers.on_free),
)
# Targets the scheduler processes need; the server entry points are checked by the launcher.
SCHEDULER_TARGETS = (*(name for name, _ in REQUEST_HOOKS + LAYER_HOOKS), "storage_base", "prefill_batch",
                     "run_batch", "controller_reset", "storage_metrics", "pd_send", "pd_manager", "schedule_batch",
                     "scheduler", "req", "radix_cache", "controller", "prefetch_operation",
                     "decode_queue", "host_pool", "device_pool", "mla_host_pool", "mla_device_pool", "storage_config",
                     "layer_done_counter")
CPU_TARGETS = tuple(sorted({name for name, _, _ in cpu.hooks()} | {"host_pool", "device_pool", "mla_host_pool",
                                                                   "mla_device_pool", "host_memory_reserve"}))


def register() -> None:
    registry, around = surface.resolve("hook_registry"), surface.resolve("hook_type").AROUND
    if multiprocessing.parent_process() is None:  # a server's main process
        from dualpath.srt import server

        registry.register(surface.TARGETS["http_launch"], server.on_launch, around)
        return
    config = SrtConfig.from_env()
    on_cpu = os.environ.get(CPU_ENV) == "1" and cpu.needed()
    if config is None and not on_cpu:
        return
    try:
        surface.self_check((SCHEDULER_TARGETS if config else ()) + (CPU_TARGETS if on_cpu else ()))
    except surface.HookTargetError as exc:
        log.critical("%s", exc)
        raise SystemExit(f"DualPath cannot start: {exc}") from exc  # load_plugins() swallows Exceptions
    hooks: list[tuple[str, Any]] = []
    if on_cpu:  # first: SGLang wraps later hooks around earlier ones, and DualPath's layer hooks call these
        cpu.install_rotary_standin()
        cpu.reserve_less_host_memory()
        hooks += [(surface.TARGETS[name] + (f".{method}" if method else ""), hook)
                  for name, method, hook in cpu.hooks()]
    if config is not None:
        from dualpath.srt.storage import DualPathStorage  # imports SGLang's storage base: scheduler processes only

        hooks += [(surface.TARGETS[name], hook) for name, hook in REQUEST_HOOKS]
        hooks.append((surface.TARGETS["controller_reset"], DualPathStorage.on_controller_reset))
        if config.role == "prefill" and config.prefill_quota_ms > 0:
            profile = CostProfile(AttentionCostModel(*config.cost_model) if config.cost_model else None)
            hooks += [(surface.TARGETS["prefill_batch"], QuotaHook(config.prefill_quota_ms / 1e3, profile)),
                      (surface.TARGETS["run_batch"], BatchTimer(profile))]
        if config.role == "prefill" and (link := traffic.compute_nic(config)) is not None:
            hooks.append((surface.TARGETS["pd_send"], traffic.PdTransferPacing(link)))
        if config.role == "prefill" and config.layerwise:
            hooks += [(surface.TARGETS[name], hook) for name, hook in LAYER_HOOKS]
        if config.role == "decode":  # it forwards the pages its host pool holds until they are freed
            hooks.append((surface.TARGETS["host_free"], held.on_host_free))
    for path, hook in hooks:
        registry.register(path, hook, around)
    log.info("DualPath plugin: %s (CPU support: %s)",
             f"{config.role} on node {config.node}" if config else "off", on_cpu)
