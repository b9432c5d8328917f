"""The router's command line against the real sglang-router 0.3.2: every flag of its ``--help`` and its
documented PD launch lines."""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dualpath.router import PrefillSpec, parse_args
from dualpath.router.config import build_parser

pytest.importorskip("sglang_router", reason="the compatibility tests need `pip install sglang-router==0.3.2`")

PD = ["--pd-disaggregation", "--prefill", "http://127.0.0.1:30100", "--decode", "http://127.0.0.1:30200"]


def stock_help_flags() -> list[str]:
    """Every long option ``python -m sglang_router.launch_router --help`` lists."""
    text = subprocess.run([sys.executable, "-m", "sglang_router.launch_router", "--help"], capture_output=True,
                          text=True, check=True).stdout
    return sorted(set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.MULTILINE)) - {"--help"})


FORMATTED = {"--control-plane-api-keys": "id1:ops:admin:secret", "--jwt-role-mapping": "ops=admin"}  # checked by stock


def non_default_values(action: argparse.Action) -> list[str]:
    """Command-line values that give ``action`` something other than its default."""
    if action.nargs == 0:
        return []
    if action.option_strings[-1] in FORMATTED:
        value = FORMATTED[action.option_strings[-1]]
    elif action.choices:
        value = next(str(choice) for choice in action.choices if choice != action.default)
    elif action.type is int:
        value = str((action.default or 0) + 7)
    elif action.type is float:
        value = str((action.default or 0.0) + 0.25)
    else:
        value = "k=v"  # a string that also parses as a selector or role mapping
    return [value, value] if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1) \
        else [value]


def test_every_flag_of_the_stock_help_is_taken_or_named_in_one_warning() -> None:
    flags = stock_help_flags()
    assert len(flags) > 90  # sglang-router 0.3.2 lists 98; a broken --help parse would find few
    actions = {option: action for action in build_parser()._actions for option in action.option_strings}
    base = parse_args(PD)
    assert base.ignored == ()
    assert (base.host, base.port, base.prometheus_host, base.prometheus_port) == ("0.0.0.0", 30000, "0.0.0.0", 29000)
    taken, warned = [], []
    for flag in flags:
        if flag in ("--pd-disaggregation", "--prefill", "--decode"):
            continue
        assert flag in actions, f"{flag} of sglang-router's --help is not accepted"
        config = parse_args([*PD, flag, *non_default_values(actions[flag])])
        if config.ignored:
            assert config.ignored == (flag,), f"{flag} warned as {config.ignored}"
            assert config == base  # compare=False on `ignored`: nothing else changed
            warned.append(flag)
        else:
            assert config != base, f"{flag} was neither taken nor warned about"
            taken.append(flag)
    assert set(taken) == {"--host", "--port", "--request-timeout-secs", "--queue-timeout-secs", "--max-payload-size",
                          "--retry-max-retries", "--disable-retries", "--shutdown-grace-period-secs", "--log-level",
                          "--prometheus-host", "--prometheus-port", "--request-id-headers",
                          "--prometheus-duration-buckets", "--retry-initial-backoff-ms", "--retry-max-backoff-ms",
                          "--retry-backoff-multiplier", "--retry-jitter-factor", "--cb-failure-threshold",
                          "--cb-success-threshold", "--cb-timeout-duration-secs", "--cb-window-duration-secs",
                          "--disable-circuit-breaker", "--model-path", "--tokenizer-path", "--chat-template"}
    assert "--policy" in warned and "--api-key" in warned and len(warned) == len(flags) - 3 - len(taken)


def test_prefill_bootstrap_ports_parse_as_stock_and_bad_values_exit_with_a_message(capsys) -> None:
    config = parse_args(["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "9000", "--prefill",
                         "http://127.0.0.1:2", "none", "--prefill", "http://127.0.0.1:3", "--decode",
                         "http://127.0.0.1:4", "--disable-retries"])
    assert config.prefill == (PrefillSpec("http://127.0.0.1:1", 9000), PrefillSpec("http://127.0.0.1:2"),
                              PrefillSpec("http://127.0.0.1:3"))
    assert config.max_retries == 0
    for argv, message in [(["--prefill", "http://h:1", "1", "2"], "URL \\[BOOTSTRAP_PORT\\|none\\]"),
                          (["--prefill", "http://h:1", "x"], "integer or 'none'"),
                          (["--prefill", "h:1"], "http://host:port"),
                          (["--prefill", "http://h:1", "--dualpath-mode", "fast"], "--dualpath-mode"),
                          (["--prefill", "http://h:1", "--log-level", "loud"], "invalid choice"),
                          (["--prefill", "http://h:1", "--prometheus-port", "70000"], "--prometheus-port")]:
        with pytest.raises(SystemExit):
            parse_args(["--pd-disaggregation", "--decode", "http://h:2", *argv])
        assert re.search(message, capsys.readouterr().err), argv
    with pytest.raises(SystemExit):  # regular (non-PD) mode is the stock router's, not ours
        parse_args(["--worker-urls", "http://h:1"])
    assert "serves PD disaggregation" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> int | None:
    with contextlib.suppress(OSError):
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.status
        except urllib.error.HTTPError as error:
            return error.code
    return None


@pytest.mark.parametrize(("line", "warned"), [
    # sglang-router 0.3.2's own --help examples for PD mode, on loopback addresses
    ("--prefill http://127.0.0.1:30101 9000 --prefill http://127.0.0.1:30102 --decode http://127.0.0.1:30201 "
     "--decode http://127.0.0.1:30202 --policy cache_aware", ""),  # stock's default policy: nothing to warn
    ("--prefill http://127.0.0.1:30101 9000 --prefill http://127.0.0.1:30102 none --prefill http://127.0.0.1:30103 "
     "--decode http://127.0.0.1:30201 --decode http://127.0.0.1:30202", ""),
    ("--prefill http://127.0.0.1:30101 --prefill http://127.0.0.1:30102 --decode http://127.0.0.1:30201 "
     "--decode http://127.0.0.1:30202 --prefill-policy cache_aware --decode-policy power_of_two",
     "--prefill-policy --decode-policy"),
])
def test_the_stock_pd_launch_lines_start_the_router(line: str, warned: str, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    argv = ["--pd-disaggregation", *line.split(), "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        router = subprocess.Popen([sys.executable, "-m", "dualpath.launch_router", *argv], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while answers(f"http://127.0.0.1:{port}/health") is None and time.monotonic() < deadline:
            assert router.poll() is None, log.read_text()
            time.sleep(0.1)
        assert answers(f"http://127.0.0.1:{port}/health") == 200  # alive: stock's liveness
        assert answers(f"http://127.0.0.1:{port}/readiness") == 503  # the engines are not there
        assert answers(f"http://127.0.0.1:{metrics_port}/metrics") == 200  # stock's Prometheus address
        warnings = [text.split(": ")[-1] for text in log.read_text().splitlines() if "ignored (no meaning" in text]
        assert warnings == ([warned] if warned else []), log.read_text()
    finally:
        router.terminate()
        router.wait(20)
