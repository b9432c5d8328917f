"""Router configuration and its command line: ``sglang_router.launch_router --pd-disaggregation``'s own.

The parser is sglang-router's (``RouterArgs.add_cli_args`` of the pinned package, through
``dualpath.srt.stock_router``), so every stock flag is accepted with its own default and meaning; DualPath's
options come on top. Stock flags that mean the same here set the router (listening address, ``--prefill URL
[PORT|none]``, timeouts, payload size, retries and their backoff, the circuit breaker, log level, Prometheus
address and buckets, request-id headers, the tokenizer); the others have no meaning under the DualPath
scheduler and are listed in one start-up warning when given.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from dualpath.router.breaker import BreakerConfig
from dualpath.scheduler.modes import MODES
from dualpath.srt.stock_router import add_stock_flags, stock_args

ROUTER_MODES = tuple(name for name, mode in MODES.items() if mode.router)  # what --dualpath-mode accepts
_PLAIN_NAME = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_.-]*")
LOG_LEVELS = ("debug", "info", "warn", "error")


class PrefillSpec(NamedTuple):
    url: str
    bootstrap_port: int | None = None  # None: no bootstrap port in the request (as stock, ``--prefill URL none``)


def check_url(url: str) -> str:
    """An engine base URL: ``http(s)://host:port`` without a path; returned without a trailing slash."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path.strip("/"):
        raise ValueError(f"engine URL must look like http://host:port, got {url!r}")
    return url.rstrip("/")


def _check_port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{what} must be in 1..65535, got {port}")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs; ``build_app(config)`` serves it, ``to_argv(config)`` is its command line.

    store_root: the shared block store's mount on the router's host (read through ``dualpath.store.StoreIndex``
        only); without it hit estimates are 0. Node read queues come from the servers' reports.
    report_timeout_s: an engine whose polls have failed this long is down.
    store_namespace / store_block_tokens: where in the store and in which block size hit estimates look;
        None takes what the DualPath servers report in /dualpath/info (store_namespace, page_size).
    read_tokens_per_s / gpu_tokens_per_s: profiled rates that set the scheduler's alpha (3 s of one node's
        reads) and beta (5 s of one GPU's prefill).
    """

    prefill: tuple[PrefillSpec, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 30000
    mode: str = "dualpath"  # one of ROUTER_MODES
    store_root: Path | None = None
    store_namespace: str | None = None
    store_block_tokens: int | None = None
    load_poll_interval_s: float = 0.2
    report_timeout_s: float = 2.0
    read_tokens_per_s: float = 1_250_000.0
    gpu_tokens_per_s: float = 40_000.0
    request_timeout_s: float = 1800.0
    queue_timeout_s: float = 60.0
    max_body_bytes: int = 512 * 1024 * 1024
    max_retries: int = 5
    shutdown_drain_s: float = 180.0
    log_level: str = "info"
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 0  # 0: /metrics on the router's own port only
    retry_initial_backoff_ms: int = 50
    retry_max_backoff_ms: int = 30000
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    model_path: str | None = None  # the served model's tokenizer: text and chat prompts get hit estimates
    tokenizer_path: str | None = None  # a tokenizer other than the model's
    chat_template: str | None = None  # a chat template other than the tokenizer's (a file, or the template)
    request_id_headers: tuple[str, ...] | None = None  # None: stock's (x-request-id, x-correlation-id, ...)
    duration_buckets: tuple[float, ...] | None = None  # None: stock's, 1 ms .. 240 s
    ignored: tuple[str, ...] = field(default=(), compare=False)  # stock flags given that mean nothing here

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("PD mode needs at least one --prefill and one --decode server")
        prefill = tuple(PrefillSpec(check_url(url), None if port is None else int(port)) for url, port in self.prefill)
        decode = tuple(check_url(url) for url in self.decode)
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "decode", decode)
        urls = [spec.url for spec in prefill] + list(decode)
        if len(set(urls)) != len(urls):
            raise ValueError(f"an engine URL is listed twice: {urls}")
        for spec in prefill:
            if spec.bootstrap_port is not None:
                _check_port(spec.bootstrap_port, f"bootstrap port of {spec.url}")
        _check_port(self.port, "--port")
        if self.prometheus_port:
            _check_port(self.prometheus_port, "--prometheus-port")
        if self.request_id_headers is not None:
            object.__setattr__(self, "request_id_headers", tuple(name.lower() for name in self.request_id_headers))
        if self.duration_buckets is not None:
            object.__setattr__(self, "duration_buckets", tuple(float(bound) for bound in self.duration_buckets))
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"--dualpath-mode must be one of {', '.join(ROUTER_MODES)}, got {self.mode!r}")
        if self.store_root is not None:
            object.__setattr__(self, "store_root", Path(self.store_root))
        if self.store_namespace is not None and not _PLAIN_NAME.fullmatch(self.store_namespace):
            raise ValueError(f"--store-namespace must be a plain directory name, got {self.store_namespace!r}")
        if self.store_block_tokens is not None and self.store_block_tokens <= 0:
            raise ValueError(f"--store-block-tokens must be positive, got {self.store_block_tokens}")
        positive = {"load_poll_interval_s": self.load_poll_interval_s, "report_timeout_s": self.report_timeout_s,
                    "read_tokens_per_s": self.read_tokens_per_s,
                    "gpu_tokens_per_s": self.gpu_tokens_per_s, "request_timeout_s": self.request_timeout_s,
                    "queue_timeout_s": self.queue_timeout_s, "max_body_bytes": self.max_body_bytes,
                    "shutdown_drain_s": self.shutdown_drain_s}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not (0 <= self.retry_initial_backoff_ms <= self.retry_max_backoff_ms and self.retry_backoff_multiplier >= 1
                and 0 <= self.retry_jitter_factor <= 1):
            raise ValueError("retry backoff: need 0 <= initial <= max backoff, multiplier >= 1, 0 <= jitter <= 1")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry ``retry`` (1, 2, ...): exponential, capped, with jitter, as the stock router's."""
        base = min(self.retry_initial_backoff_ms * self.retry_backoff_multiplier ** (retry - 1),
                   self.retry_max_backoff_ms) / 1000
        return base * (1 + self.retry_jitter_factor * random.uniform(-1.0, 1.0))


# sglang-router's RouterArgs fields (and argparse dests) that mean the same here -> RouterConfig fields.
STOCK_FIELDS = {"host": "host", "port": "port", "request_timeout_secs": "request_timeout_s",
                "queue_timeout_secs": "queue_timeout_s", "max_payload_size": "max_body_bytes",
                "retry_max_retries": "max_retries", "shutdown_grace_period_secs": "shutdown_drain_s",
                "log_level": "log_level", "prometheus_host": "prometheus_host", "prometheus_port": "prometheus_port",
                "request_id_headers": "request_id_headers", "prometheus_duration_buckets": "duration_buckets",
                "model_path": "model_path", "tokenizer_path": "tokenizer_path", "chat_template": "chat_template",
                **{name: name for name in ("retry_initial_backoff_ms", "retry_max_backoff_ms",
                                           "retry_backoff_multiplier", "retry_jitter_factor")}}
# The circuit breaker's stock flags -> BreakerConfig fields.
BREAKER_FIELDS = {"cb_failure_threshold": "failure_threshold", "cb_success_threshold": "success_threshold",
                  "cb_timeout_duration_secs": "open_s", "cb_window_duration_secs": "window_s"}
# Stock fields read another way: PD mode itself, the engines, retries and the breaker switched off or set.
_STOCK_READ = {"pd_disaggregation", "prefill", "decode", "disable_retries", "disable_circuit_breaker",
               *BREAKER_FIELDS}

# (option, RouterConfig field, type, help) of DualPath's own options; one table drives parser and to_argv.
_SCALARS: tuple[tuple[str, str, type, str], ...] = (
    ("--dualpath-mode", "mode", str, "; ".join(f"{name}: {MODES[name].summary}" for name in ROUTER_MODES)),
    ("--store-root", "store_root", Path, "the shared block store's mount on this host (hit estimates)"),
    ("--store-namespace", "store_namespace", str, "store namespace of the hit estimates (default: the servers')"),
    ("--store-block-tokens", "store_block_tokens", int, "Full Block tokens (default: the servers' page size)"),
    ("--load-poll-interval", "load_poll_interval_s", float, "seconds between polls of /dualpath/info and /v1/loads"),
    ("--node-report-timeout-secs", "report_timeout_s", float, "an engine whose polls fail this long is down"),
    ("--read-tokens-per-s", "read_tokens_per_s", float, "profiled storage read rate of one node (alpha = 3 s)"),
    ("--gpu-tokens-per-s", "gpu_tokens_per_s", float, "profiled prefill rate of one GPU (beta = 5 s)"),
)


def build_parser() -> argparse.ArgumentParser:
    """sglang-router's own parser (every stock flag, stock defaults) with DualPath's options added."""
    parser = argparse.ArgumentParser(prog="python -m dualpath.launch_router", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_stock_flags(parser)
    group = parser.add_argument_group("DualPath", "the global scheduler's options (stock flags above keep "
                                      "their meaning where they have one here; see docs/router.md)")
    defaults = RouterConfig((PrefillSpec("http://h:1"),), ("http://h:2",))
    for option, name, kind, text in _SCALARS:
        group.add_argument(option, dest=name, type=kind, default=getattr(defaults, name), help=text)
    return parser


def _prefill_spec(values: Sequence[str]) -> PrefillSpec:
    if len(values) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT|none], got {' '.join(values)}")
    if len(values) == 1 or values[1].lower() == "none":
        return PrefillSpec(values[0])
    try:
        return PrefillSpec(values[0], int(values[1]))
    except ValueError:
        raise ValueError(f"bootstrap port of --prefill {values[0]} must be an integer or 'none', "
                         f"got {values[1]!r}") from None


def _ignored(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The stock flags given (values other than their defaults) that mean nothing under the DualPath scheduler."""
    read = {*STOCK_FIELDS, *_STOCK_READ, *(name for _, name, _, _ in _SCALARS), "help"}
    return tuple(action.option_strings[-1] for action in parser._actions
                 if action.dest not in read and getattr(args, action.dest) != action.default)


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """The command line as a RouterConfig; bad values exit with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.pd_disaggregation or not args.prefill or not args.decode:
        parser.error("dualpath.launch_router serves PD disaggregation: pass --pd-disaggregation, one --prefill "
                     "URL [BOOTSTRAP_PORT] per prefill server and one --decode URL per decode server")
    try:
        prefill = tuple(_prefill_spec(values) for values in args.prefill)
        stock = stock_args(args)
        taken = {ours: getattr(stock, theirs) for theirs, ours in STOCK_FIELDS.items()}
        if stock.disable_retries:
            taken["max_retries"] = 0
        taken["breaker"] = BreakerConfig(**{ours: getattr(stock, theirs) for theirs, ours in BREAKER_FIELDS.items()},
                                         enabled=not stock.disable_circuit_breaker)
        return RouterConfig(
            prefill=prefill, decode=tuple(stock.decode_urls), **taken, ignored=_ignored(parser, args),
            **{name: getattr(args, name) for _, name, _, _ in _SCALARS},
        )
    except ValueError as exc:
        parser.error(str(exc))


def _stock_value(value: object) -> str:
    """Stock flags take whole seconds and bytes as integers."""
    return str(int(value) if isinstance(value, float) and value.is_integer() else value)


def to_argv(config: RouterConfig) -> list[str]:
    """The command line that ``parse_args`` turns back into ``config`` (for launching a router subprocess)."""
    argv = ["--pd-disaggregation"]
    for spec in config.prefill:
        argv += ["--prefill", spec.url, "none" if spec.bootstrap_port is None else str(spec.bootstrap_port)]
    for url in config.decode:
        argv += ["--decode", url]
    stock = [(theirs, getattr(config, ours)) for theirs, ours in STOCK_FIELDS.items()]
    stock += [(theirs, getattr(config.breaker, ours)) for theirs, ours in BREAKER_FIELDS.items()]
    for theirs, value in stock:
        if value is not None:
            values = value if isinstance(value, tuple) else (value,)
            argv += [f"--{theirs.replace('_', '-')}", *map(_stock_value, values)]
    if not config.breaker.enabled:
        argv.append("--disable-circuit-breaker")
    for option, name, _, _ in _SCALARS:
        value = getattr(config, name)
        if value is not None:
            argv += [option, str(value)]
    return argv
