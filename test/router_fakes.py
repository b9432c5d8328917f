"""Fake SGLang servers for the router tests: the HTTP surface the router uses, recording what they get.

A fake answers ``/generate``, ``/v1/completions`` and ``/v1/chat/completions`` (streaming too),
``/v1/loads``, ``/v1/models``, ``/health``, ``/health_generate`` (503 while ``loading``), ``/get_model_info``,
``/get_server_info``, ``POST /flush_cache`` (counted) and (when DualPath-enabled) ``/dualpath/info``, whose
node read queue is ``queued_tokens``. Requests can be held on a
gate to build up load. ``python router_fakes.py --role decode --name d0 --port N`` runs one as a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from dualpath.scheduler.report import KVChannelAddress, NodeReport


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeEngine:
    """One fake server. ``gate`` (when set) holds every generation request until it is set."""

    role: str
    name: str
    node: str = ""
    dualpath: bool = True
    models: tuple[str, ...] = ("tiny-model",)
    capacity_tokens: int = 1_000_000
    output_tokens: int = 4
    page_size: int = 64
    tp_size: int = 1
    store_namespace: str = "tiny-64t"
    gate: asyncio.Event | None = None
    fail_status: int | None = None  # answer every generation request with this error status
    # Load reported beyond the requests it holds (another router's work).
    extra_reqs: int = 0
    extra_tokens: int = 0
    queued_tokens: int = 0  # its node's storage read queue, as it reports it
    loading: bool = False  # health answers 503, as SGLang's while its model loads
    flushes: int = 0
    chunk_delay_s: float = 0.0  # between the chunks of a stream
    stream_ids: bool = False  # stream chunks carry the output ids so far, as SGLang's without a tokenizer
    read_bytes: int = 1000  # its node's storage NIC, as it reports it
    read_bytes_per_request: int = 0  # added to read_bytes by every generation request
    streams_cut: int = 0  # streams whose reader went away before the last chunk
    received: list[Received] = field(default_factory=list)
    held_reqs: int = 0
    held_tokens: int = 0
    url: str = ""
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        app.router.add_get("/v1/loads", self._loads)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health)
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_get("/get_server_info", self._server_info)
        app.router.add_post("/flush_cache", self._flush)
        if self.dualpath:
            app.router.add_get("/dualpath/info", self._info)
        return app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, bound = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_received(self, count: int, timeout: float = 20.0) -> None:
        """Until at least ``count`` generation requests arrived."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout)

    async def _info(self, request: web.Request) -> web.Response:
        channel = KVChannelAddress(f"agent-{self.name}", "127.0.0.1", 7000)
        report = NodeReport(role=self.role, node=self.node or self.name, model=self.models[0],
                            page_size=self.page_size, tp_size=self.tp_size, kv_channel=channel,
                            store_namespace=self.store_namespace, queued_tokens=self.queued_tokens,
                            queued_bytes=100 * self.queued_tokens, read_bytes=self.read_bytes)
        return web.Response(body=report.encode(), content_type="application/json")

    async def _loads(self, request: web.Request) -> web.Response:
        return web.json_response({"loads": [{
            "num_running_reqs": self.held_reqs + self.extra_reqs, "num_waiting_reqs": 0,
            "num_used_tokens": self.held_tokens + self.extra_tokens, "max_total_num_tokens": self.capacity_tokens,
        }]})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.loading else 200)

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.models[0], "tokenizer_path": self.models[0],
                                  "is_generation": True, "served_by": self.name})

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.models[0], "disaggregation_mode": self.role,
                                  "served_by": self.name})

    async def _flush(self, request: web.Request) -> web.Response:
        self.flushes += 1
        return web.Response(text="Cache flushed.")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with self._arrived:
            self.received.append(Received(request.path, body, dict(request.headers)))
            self._arrived.notify_all()
        if self.fail_status is not None:
            return web.json_response({"error": {"message": f"{self.name} fails"}}, status=self.fail_status)
        tokens = prompt_tokens(body)
        self.read_bytes += self.read_bytes_per_request
        self.held_reqs += 1
        self.held_tokens += tokens
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.held_reqs -= 1
            self.held_tokens -= tokens
        reply: dict[str, Any] = {"engine": self.name, "bootstrap_room": body.get("bootstrap_room"),
                                 "path": request.path}
        if body.get("return_logprob"):  # SGLang's PD halves: the prefill's input logprobs, one of the decode's
            ids = body.get("input_ids") or [0]
            reply["meta_info"] = {"input_token_logprobs": [[-1.0, t, None] for t in ids] if self.role == "prefill"
                                  else [[-2.0, ids[-1], None]]}
        if not body.get("stream"):
            return web.json_response(self._final(request.path, reply))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(self.output_tokens):
            chunk = self._final(request.path, reply) if index == self.output_tokens - 1 else reply
            if self.stream_ids:
                chunk = {**chunk, "output_ids": list(range(100, 101 + index))}
            try:
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            except ConnectionResetError:
                self.streams_cut += 1
                raise
            await asyncio.sleep(self.chunk_delay_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _final(self, path: str, reply: dict[str, Any]) -> dict[str, Any]:
        if path == "/generate":
            meta = {**reply.get("meta_info", {}), "completion_tokens": self.output_tokens}
            return {**reply, "text": f"from {self.name}", "meta_info": meta}
        return {**reply, "choices": [{"index": 0, "text": f"from {self.name}"}],
                "usage": {"completion_tokens": self.output_tokens}}


def prompt_tokens(body: dict[str, Any]) -> int:
    """What a fake counts as a request's tokens: its ids, or a quarter of its text."""
    prompt = body.get("input_ids") or body.get("prompt") or body.get("text") or body.get("messages") or ""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return max(1, len(json.dumps(prompt)) // 4)


@contextlib.asynccontextmanager
async def serving(app: web.Application, shutdown_timeout: float = 1.0) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="one fake SGLang server")
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold", action="store_true", help="hold every generation request until killed")
    args = parser.parse_args()

    async def serve() -> None:
        engine = FakeEngine(args.role, args.name, gate=asyncio.Event() if args.hold else None)
        await engine.start(args.port)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
