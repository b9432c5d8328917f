"""DualPath in a server's main process: decided from SGLang's own parsed arguments when the server launches.

The plugin hooks SGLang's HTTP ``launch_server(server_args)`` (:func:`on_launch`). When the HiCache storage
backend's extra-config names DualPath, the hook checks the SGLang settings DualPath relies on, resolves the
DualPath configuration (:meth:`SrtConfig.from_extra_config`), hands it to every process SGLang spawns, and
adds ``GET /dualpath/info`` (the server's :class:`NodeReport`) to SGLang's HTTP app. Otherwise the server is
stock SGLang.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dualpath.scheduler.report import REPORT_ROUTE
from dualpath.srt import cpu, surface
from dualpath.srt.config import CPU_ENV, ENV, SrtConfig
from dualpath.srt.state import ServerReporter

# What a server's main process uses of SGLang (its scheduler processes check theirs when the plugin loads).
MAIN_TARGETS = ("server_args", "parse_extra_config", "local_ip", "http_app")


def required(server_args: Any) -> dict[str, tuple[str, object]]:
    """The SGLang settings DualPath needs on this server: server_args field -> (its flag, the value)."""
    needs = dict(surface.REQUIRED)
    if surface.launch_settings(server_args).role == "decode":
        needs |= surface.DECODE_REQUIRED
    if cpu.needed():
        needs |= surface.CPU_REQUIRED
    return needs


def config_of(server_args: Any) -> SrtConfig | None:
    """The server's DualPath configuration, None when its storage backend is not DualPath; ``ValueError``
    naming the setting when the server cannot run DualPath as configured."""
    settings = surface.launch_settings(server_args)
    if settings.storage_backend != "dynamic" or not settings.extra_config:
        return None
    surface.self_check(MAIN_TARGETS)
    extra, prefetch_threshold, *_ = surface.resolve("parse_extra_config")(settings.extra_config)
    config = SrtConfig.from_extra_config(extra, settings.role, settings.model or "model", settings.page_size or 1,
                                         settings.host, settings.tp_size)
    if config is None:
        return None
    config = replace(config, prefetch_threshold=prefetch_threshold)
    wrong = [flag if needed is True else f"{flag} {needed}" for field, (flag, needed) in required(server_args).items()
             if surface.setting(server_args, field) != needed]
    if wrong:
        raise ValueError(f"the DualPath storage backend needs {' '.join(wrong)}")
    return config


def on_launch(original: Callable[..., Any], server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of SGLang's HTTP ``launch_server``."""
    try:
        config = config_of(server_args)
    except (ValueError, surface.HookTargetError) as exc:
        raise SystemExit(f"DualPath cannot start: {exc}") from exc
    if cpu.needed() and (config is not None or os.environ.get(CPU_ENV) == "1"):
        cpu.export(surface.launch_settings(server_args).tp_size)
    if config is not None:
        os.environ[ENV] = config.to_env()  # inherited by every process SGLang spawns
        add_report_route(config)
    return original(server_args, *args, **kwargs)


def add_report_route(config: SrtConfig) -> None:
    from fastapi.responses import Response

    reporter = ServerReporter(config)

    async def dualpath_info() -> Response:
        return Response(reporter.report().encode(), media_type="application/json")

    surface.resolve("http_app").add_api_route(REPORT_ROUTE, dualpath_info, methods=["GET"])
