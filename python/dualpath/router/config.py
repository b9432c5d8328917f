"""Router configuration and its command line, compatible with ``sglang_router.launch_router --pd-disaggregation``.

``--prefill URL [BOOTSTRAP_PORT]`` and ``--decode URL`` repeat, one per server; ``--policy`` and friends are
accepted so that stock launch lines keep working, and ignored: the DualPath global scheduler places requests.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

Mode = Literal["dualpath", "split", "baseline"]
DEFAULT_BOOTSTRAP_PORT = 8998
_PLAIN_NAME = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_.-]*")
STOCK_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "manual", "bucket")


class PrefillSpec(NamedTuple):
    url: str
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT


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
    mode: Mode = "dualpath"
    store_root: Path | None = None
    store_namespace: str | None = None
    store_block_tokens: int | None = None
    load_poll_interval_s: float = 0.2
    report_timeout_s: float = 2.0
    read_tokens_per_s: float = 1_250_000.0
    gpu_tokens_per_s: float = 40_000.0
    request_timeout_s: float = 1800.0
    queue_timeout_s: float = 300.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_retries: int = 1
    shutdown_drain_s: float = 60.0
    ignored_policy: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("PD mode needs at least one --prefill and one --decode server")
        prefill = tuple(PrefillSpec(check_url(url), int(port)) for url, port in self.prefill)
        decode = tuple(check_url(url) for url in self.decode)
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "decode", decode)
        urls = [spec.url for spec in prefill] + list(decode)
        if len(set(urls)) != len(urls):
            raise ValueError(f"an engine URL is listed twice: {urls}")
        for spec in prefill:
            _check_port(spec.bootstrap_port, f"bootstrap port of {spec.url}")
        _check_port(self.port, "--port")
        if self.mode not in ("dualpath", "split", "baseline"):
            raise ValueError(f"--dualpath-mode must be dualpath, split or baseline, got {self.mode!r}")
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


# (option, RouterConfig field, type, help) of the scalar options; one table drives parser and to_argv.
_SCALARS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--dualpath-mode", "mode", str, "dualpath: the scheduler picks the read side; split: it may also split one "
     "request's reads between both sides, so that both queues drain together; baseline: always the PE side"),
    ("--store-root", "store_root", Path, "the shared block store's mount on this host (hit estimates)"),
    ("--store-namespace", "store_namespace", str, "store namespace of the hit estimates (default: the servers')"),
    ("--store-block-tokens", "store_block_tokens", int, "Full Block tokens (default: the servers' page size)"),
    ("--load-poll-interval", "load_poll_interval_s", float, "seconds between polls of /dualpath/info and /v1/loads"),
    ("--node-report-timeout-secs", "report_timeout_s", float, "an engine whose polls fail this long is down"),
    ("--read-tokens-per-s", "read_tokens_per_s", float, "profiled storage read rate of one node (alpha = 3 s)"),
    ("--gpu-tokens-per-s", "gpu_tokens_per_s", float, "profiled prefill rate of one GPU (beta = 5 s)"),
    ("--request-timeout-secs", "request_timeout_s", float, "bound on one engine call, streaming included"),
    ("--queue-timeout-secs", "queue_timeout_s", float, "bound on waiting for an engine with room (then 503)"),
    ("--max-body-bytes", "max_body_bytes", int, "larger request bodies get 413"),
    ("--max-retries", "max_retries", int, "retries on another pair after an engine failure (then 502)"),
    ("--shutdown-drain-secs", "shutdown_drain_s", float, "on SIGTERM, how long in-flight requests may finish"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualpath.launch_router", description=__doc__)
    parser.add_argument("--pd-disaggregation", action="store_true", required=True,
                        help="PD mode (the only mode; required for command-line compatibility)")
    parser.add_argument("--prefill", nargs="+", action="append", required=True, metavar=("URL", "BOOTSTRAP_PORT"),
                        help=f"a prefill server and its bootstrap port (default {DEFAULT_BOOTSTRAP_PORT}); repeat")
    parser.add_argument("--decode", action="append", required=True, metavar="URL", help="a decode server; repeat")
    for flag in ("--policy", "--prefill-policy", "--decode-policy"):
        parser.add_argument(flag, choices=STOCK_POLICIES, help="accepted for compatibility and ignored")
    defaults = RouterConfig((PrefillSpec("http://h:1"),), ("http://h:2",))
    for option, name, kind, text in _SCALARS:
        parser.add_argument(option, dest=name, type=kind, default=getattr(defaults, name), help=text)
    return parser


def _prefill_spec(values: Sequence[str]) -> PrefillSpec:
    if len(values) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
    if len(values) == 1:
        return PrefillSpec(values[0])
    try:
        return PrefillSpec(values[0], int(values[1]))
    except ValueError:
        raise ValueError(f"bootstrap port of --prefill {values[0]} must be an integer, got {values[1]!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """The command line as a RouterConfig; bad values exit with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ignored = args.policy or args.prefill_policy or args.decode_policy
    try:
        return RouterConfig(
            prefill=tuple(_prefill_spec(values) for values in args.prefill),
            decode=tuple(args.decode),
            ignored_policy=ignored,
            **{name: getattr(args, name) for _, name, _, _ in _SCALARS},
        )
    except ValueError as exc:
        parser.error(str(exc))


def to_argv(config: RouterConfig) -> list[str]:
    """The command line that ``parse_args`` turns back into ``config`` (for launching a router subprocess)."""
    argv = ["--pd-disaggregation"]
    for spec in config.prefill:
        argv += ["--prefill", spec.url, str(spec.bootstrap_port)]
    for url in config.decode:
        argv += ["--decode", url]
    for option, name, _, _ in _SCALARS:
        value = getattr(config, name)
        if value is not None:
            argv += [option, str(value)]
    return argv
