"""Real SGLang servers (with or without the DualPath plugin) as child process groups on loopback.

Every server runs in its own session so that stopping it reaches every process SGLang spawned; its log
goes to a file whose tail is shown when it fails to start. On a machine without CUDA the servers run the
tiny dummy-weight Llama shipped with the package on SGLang's torch-native CPU path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dualpath.scheduler.report import REPORT_ROUTE, NodeReport
from dualpath.srt import surface
from dualpath.srt.config import PLAIN_BACKEND

TINY_MODEL = Path(__file__).resolve().parent.parent / "srt" / "tiny_llama"
TINY_MLA_MODEL = TINY_MODEL.parent / "tiny_deepseek_v2"
# What SGLang needs to serve the tiny model on CPU (reference: docs/srt.md).
CPU_ARGS = ("--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu", "--attention-backend",
            "torch_native", "--dtype", "float32")
CPU_ENV = {"OMP_NUM_THREADS": "1"}
# Ports fixed from a server's HTTP port (+ 1 is usually its bootstrap port): torch.distributed's store and the
# DualPath KV channel (rank r: + r). SGLang and DualPath would pick free ones at random and bind them later, and
# servers starting at once could pick the same (EADDRINUSE).
NCCL_PORT_OFFSET, KV_PORT_OFFSET = 2, 3


@dataclass(frozen=True)
class ServerSpec:
    """One SGLang server: its role, address and HTTP port and, for DualPath, the node whose storage NIC it
    uses and the store's mount as that host sees it (None: the options' one); a stock server (``dualpath``
    False) with ``block_store`` reads and writes that store through the same NIC cap as a plain HiCache
    backend, stock SGLang's data paths (the stock baseline). ``cpus`` pins its processes to those cores
    (empty: wherever the kernel runs them). The server reaches every peer, and is reached, at
    ``host`` only (SGLang's ``--host`` and ``$SGLANG_HOST_IP``), as on a host of its own."""

    role: Literal["prefill", "decode", "null"]
    port: int
    node: str = "node0"
    bootstrap_port: int | None = None
    nic_gbps: float | None = None
    dualpath: bool = True
    block_store: bool = False
    extra_args: tuple[str, ...] = ()
    cpus: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    store_root: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class ServerOptions:
    """What every server of a run shares."""

    store_root: Path
    log_dir: Path
    model: Path = TINY_MODEL
    cpu: bool = True
    max_total_tokens: int = 65536
    transfer_timeout_s: float = 10.0
    staging_blocks: int = 512
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def tiny_model_with_layers(target: Path, layers: int, base: Path = TINY_MODEL) -> Path:
    """A tiny model's config (the tiny Llama's, or ``base``) with ``layers`` layers (dummy weights), in ``target``."""
    target.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        (target / name).write_text((base / name).read_text())
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    return target


def with_random_weights(config_dir: Path, target: Path) -> Path:
    """A copy of the model config at ``config_dir`` with random weights (transformers' initialisation, seed 0) in
    ``target``, to serve with ``--load-format safetensors``; an existing ``target`` is reused. SGLang's dummy
    weights give every token the same logit, so no KV could change an output."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one tiny shard: a bar would only clutter the command's output
    shutil.copytree(config_dir, target, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.float32).save_pretrained(target)
    return target


def has_tokenizer(model: Path) -> bool:
    return (model / "tokenizer_config.json").is_file()


def server_command(spec: ServerSpec, options: ServerOptions) -> list[str]:
    module = "dualpath.launch_server"
    cmd = [sys.executable, "-m", module, "--model-path", str(options.model), "--host", spec.host,
           "--port", str(spec.port), "--nccl-port", str(spec.port + NCCL_PORT_OFFSET),
           "--max-total-tokens", str(options.max_total_tokens)]
    if options.cpu:  # a model shipped with a tokenizer is served with it (text and chat prompts)
        cmd += [arg for arg in CPU_ARGS if arg != "--skip-tokenizer-init" or not has_tokenizer(options.model)]
    if spec.role != "null":
        cmd += ["--disaggregation-mode", spec.role, "--disaggregation-transfer-backend", "nixl"]
    if spec.bootstrap_port is not None:
        cmd += ["--disaggregation-bootstrap-port", str(spec.bootstrap_port)]
    store_root = str(spec.store_root or options.store_root)
    if spec.dualpath:
        cmd += ["--dualpath-node", spec.node, "--dualpath-store-root", store_root,
                "--dualpath-timeout", str(options.transfer_timeout_s),
                "--dualpath-kv-port", str(spec.port + KV_PORT_OFFSET),
                "--dualpath-staging-blocks", str(options.staging_blocks)]
        if spec.nic_gbps is not None:
            cmd += ["--dualpath-nic-gbps", str(spec.nic_gbps)]
    else:
        cmd += ["--dualpath-off", "--page-size", "64"]
        if spec.block_store:
            cmd += block_store_args(spec.role, {"store_root": store_root, "node": spec.node, "nic_gbps": spec.nic_gbps,
                                                "staging_blocks": options.staging_blocks,
                                                "timeout_s": options.transfer_timeout_s})
    return cmd + list(options.extra_args) + list(spec.extra_args)


def block_store_args(role: str, settings: dict[str, object]) -> list[str]:
    """Stock SGLang flags that give a server the block store as its HiCache storage backend (``settings``: the
    backend's extra-config keys, None left out). A prefill runs HiCache as DualPath's prefills do, so that the two
    differ only in DualPath, and backs up the prompt; a decode offloads what it generates (stock SGLang's
    decode write-back)."""
    extra = {**PLAIN_BACKEND, **{key: value for key, value in settings.items() if value is not None}}
    args = ["--hicache-storage-backend", "dynamic", "--hicache-storage-backend-extra-config", json.dumps(extra)]
    if role == "decode":
        return [*args, *surface.REQUIRED["hicache_mem_layout"], "--disaggregation-decode-enable-offload-kvcache"]
    return [*args, *(arg for flag, value in surface.REQUIRED.values()
                     for arg in ((flag,) if value is True else (flag, str(value))))]


def _group_stats(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc stat fields after the command name) of every process in group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append((int(stat.parent.name), fields))
    return members


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are still running (zombies, which hold nothing, excluded)."""
    return [pid for pid, fields in _group_stats(pgid) if fields[0] != "Z"]


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of group ``pgid``."""
    return sum(int(f[11]) + int(f[12]) for _, f in _group_stats(pgid)) / os.sysconf("SC_CLK_TCK")


class Server:
    """A started server; :meth:`stop` ends its whole process group."""

    def __init__(self, spec: ServerSpec, options: ServerOptions) -> None:
        self.spec = spec
        options.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = options.log_dir / f"{spec.role}-{spec.port}.log"
        env = {**os.environ, **(CPU_ENV if options.cpu else {}), "SGLANG_HOST_IP": spec.host, **options.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(server_command(spec, options), stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        if spec.cpus:  # before the server starts a thread or a process: they all inherit it
            os.sched_setaffinity(self.process.pid, spec.cpus)

    @property
    def url(self) -> str:
        return self.spec.url

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server's processes (scheduler, tokenizer, detokenizer, ...)."""
        return group_cpu_seconds(self.process.pid)

    def healthy(self) -> bool:
        return healthy(self.url)

    def report(self) -> NodeReport:
        """The server's DualPath node report, over HTTP as the router gets it."""
        with urllib.request.urlopen(f"{self.url}{REPORT_ROUTE}", timeout=5) as response:
            return NodeReport.decode(response.read())

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # SGLang's children may outlive the leader (briefly, or for good when the leader crashed); the group
        # must be empty before ports are reused.
        deadline = time.monotonic() + 10.0
        while live_group_members(self.process.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            time.sleep(0.1)


def healthy(url: str, route: str = "/health") -> bool:
    """Whether the server at ``url`` answers ``route`` with 200 (a router: ``/readiness``)."""
    try:
        with urllib.request.urlopen(f"{url}{route}", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def flush_cache(url: str, timeout_s: float = 120.0) -> None:
    """Empty the GPU and host KV caches of the server at ``url`` (SGLang's /flush_cache, which answers 400 while
    requests or cache operations are still running: retried until ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST"),
                                        timeout=10) as response:
                if b"Cache flushed" in response.read():
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 400:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} kept refusing /flush_cache for {timeout_s:.0f} s")
        time.sleep(0.5)


def post_generate(url: str, body: dict, timeout_s: float = 300.0) -> dict:
    """SGLang's ``/generate`` at ``url``: the response, or an error with what the server said."""
    request = urllib.request.Request(f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}/generate: HTTP {exc.code}: {exc.read()[:500]!r}") from exc


def pd_generate(prefill: Server, decode: Server, body: dict, routing_key: str | None = None,
                timeout_s: float = 300.0) -> tuple[dict, dict]:
    """One request on a prefill/decode pair, posted to both at once with the bootstrap fields as SGLang's router
    does (``routing_key``: a DualPath route hint); the prefill's and the decode's responses."""
    body = {**body, "bootstrap_host": prefill.spec.host, "bootstrap_port": prefill.spec.bootstrap_port,
            "bootstrap_room": secrets.randbits(63)}
    if routing_key is not None:
        body["routing_key"] = routing_key
    with ThreadPoolExecutor(2) as legs:
        prefilled = legs.submit(post_generate, prefill.url, body, timeout_s)
        decoded = legs.submit(post_generate, decode.url, body, timeout_s)
        return prefilled.result(), decoded.result()


class ServerStartError(RuntimeError):
    pass


def start_servers(specs: Sequence[ServerSpec], options: ServerOptions, timeout_s: float = 300.0) -> list[Server]:
    """Start every server at once and wait until all answer ``/health``; on failure stop them all."""
    servers = [Server(spec, options) for spec in specs]
    deadline = time.monotonic() + timeout_s
    try:
        pending = list(servers)
        while pending:
            for server in list(pending):
                if not server.alive():
                    raise ServerStartError(f"{server.spec.role} server on port {server.spec.port} exited "
                                           f"(log {server.log_path}):\n{server.log_tail()}")
                if server.healthy():
                    pending.remove(server)
            if pending and time.monotonic() > deadline:
                raise ServerStartError(f"servers not ready after {timeout_s:.0f} s: "
                                       + ", ".join(f"{s.spec.role}:{s.spec.port} (log {s.log_path})" for s in pending))
            time.sleep(1.0)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: Sequence[Server]) -> None:
    for server in servers:
        server.stop()
