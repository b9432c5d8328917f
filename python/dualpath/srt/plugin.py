"""The ``sglang.srt.plugins`` entry point: DualPath's hooks, in every SGLang process.

SGLang spawns its scheduler processes and calls ``load_plugins()`` in each, so hooks registered here
apply where the scheduler runs. The plugin does nothing unless ``$DUALPATH_SRT_CONFIG`` is set (by
``python -m dualpath.launch_server``): stock SGLang stays stock.
"""

from __future__ import annotations

import logging

from dualpath.srt import cpu, requests, targets
from dualpath.srt.config import SrtConfig

log = logging.getLogger(__name__)

# Hooks of every DualPath server: (target name, AROUND hook).
REQUEST_HOOKS = (
    ("add_request", requests.on_add_request),
    ("storage_hit_query", requests.on_operation),
    ("page_transfer", requests.on_operation),
    ("decode_prefix_match", requests.on_prefix_match),
)
# Targets the scheduler processes need; the server entry points are checked by the launcher.
SCHEDULER_TARGETS = [name for name, _ in REQUEST_HOOKS] + ["storage_base"]
CPU_TARGETS = sorted({name for name, _, _ in cpu.hooks()})


def register() -> None:
    config = SrtConfig.from_env()
    if config is None:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    on_cpu = cpu.needed()
    try:
        targets.self_check(SCHEDULER_TARGETS + (CPU_TARGETS if on_cpu else []))
    except targets.HookTargetError as exc:
        log.critical("%s", exc)
        raise SystemExit(f"DualPath cannot start: {exc}") from exc  # load_plugins() swallows Exceptions
    for name, hook in REQUEST_HOOKS:
        HookRegistry.register(targets.TARGETS[name], hook, HookType.AROUND)
    if on_cpu:
        cpu.install_rotary_standin()
        for name, method, hook in cpu.hooks():
            path = targets.TARGETS[name] + (f".{method}" if method else "")
            HookRegistry.register(path, hook, HookType.AROUND)
    log.info("DualPath plugin active: %s on node %s (CPU support: %s)", config.role, config.node, on_cpu)
