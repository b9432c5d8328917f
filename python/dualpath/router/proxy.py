"""One request through a prefill/decode pair: both legs at once, the decode's answer back, retries on failure.

The client's answer is the decode's. A leg that fails before the client got any byte (connection refused
or reset, a 5xx, a stream that ends before its first chunk) marks its engine down, aborts the other leg
and the request is placed again on another pair with a new bootstrap room, at most ``max_retries`` times,
then 502. A streaming response is held back until the decode's first chunk, so that a decode dying during
the KV transfer is still retried; one that dies later ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
import msgspec
from aiohttp import web

from dualpath.router.config import RouterConfig
from dualpath.router.decide import Decider, Placement
from dualpath.router.engines import Engine, EngineRegistry
from dualpath.router.metrics import RouterMetrics, meta_ttft, output_tokens
from dualpath.router.protocol import (
    FORWARDED_ID_HEADERS,
    PATHS,
    HttpError,
    ParsedRequest,
    merge_input_logprobs,
    new_rooms,
    pd_body,
)
from dualpath.scheduler.route_hint import ROUTING_KEY_HEADER

log = logging.getLogger(__name__)
_RETRIABLE = (aiohttp.ClientError, TimeoutError)
REQUEST_ID = web.RequestKey("request_id", str)  # set by the application's middleware


class EngineFailure(Exception):
    """An engine failed this request in a way another pair may not (it is marked down)."""

    def __init__(self, engine: Engine, reason: str) -> None:
        super().__init__(f"{engine.role} server {engine.url}: {reason}")
        self.engine = engine


class Answer(NamedTuple):
    """A complete upstream answer."""

    status: int
    content_type: str
    body: bytes


class StreamHead(NamedTuple):
    response: aiohttp.ClientResponse
    first_chunk: bytes


class SseTracker:
    """Counts the data events of a relayed SSE stream and keeps the last one (for the token count); with
    ``rewrite``, what to send is each whole data event rewritten (else every chunk as it comes)."""

    def __init__(self, rewrite: Callable[[Any], Any] | None = None) -> None:
        self._tail = b""
        self._rewrite = rewrite
        self.events = 0
        self.last = b""

    def feed(self, chunk: bytes) -> bytes:
        *events, self._tail = (self._tail + chunk).split(b"\n\n")
        out = []
        for event in events:
            event = event.strip()
            if event.startswith(b"data:") and event[5:].strip() != b"[DONE]":
                self.events += 1
                self.last = event[5:].strip()
                if self._rewrite is not None:
                    with contextlib.suppress(msgspec.DecodeError):
                        event = b"data: " + msgspec.json.encode(self._rewrite(msgspec.json.decode(self.last)))
            out.append(event + b"\n\n")
        return chunk if self._rewrite is None else b"".join(out)

    def rest(self) -> bytes:
        """What ``feed`` held back: an unterminated last event of a rewritten stream."""
        return self._tail if self._rewrite is not None else b""

    def output_tokens(self) -> int:
        with contextlib.suppress(msgspec.DecodeError):
            return output_tokens(msgspec.json.decode(self.last)) or self.events
        return self.events


class Forwarder:
    """Runs requests through pairs; ``session`` is set while the application runs."""

    def __init__(self, config: RouterConfig, registry: EngineRegistry, decider: Decider,
                 metrics: RouterMetrics) -> None:
        self.config = config
        self.registry = registry
        self.decider = decider
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Answer]] = set()

    async def handle(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        started = time.monotonic()
        failures: list[str] = []
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.config.backoff_s(attempt))
            try:
                placement = await self.decider.place(parsed)
            except TimeoutError:
                raise HttpError(503, f"no prefill/decode pair had room within {self.config.queue_timeout_s} s; "
                                f"{failures or 'no engine failure'}") from None
            self.metrics.placed(parsed.model_label, placement.hint.side.value, placement.request.cached_tokens)
            if attempt:
                self.metrics.retries.inc()
            try:
                return await self._run_pair(request, parsed, placement, started)
            except EngineFailure as exc:
                log.warning("request %d attempt %d failed: %s", placement.request.request_id, attempt + 1, exc)
                failures.append(str(exc))
        raise HttpError(502, f"the request failed on {len(failures)} prefill/decode pair(s): {'; '.join(failures)}")

    async def _run_pair(self, request: web.Request, parsed: ParsedRequest, placement: Placement,
                        started: float) -> web.StreamResponse:
        key = dataclasses.replace(placement.hint, client_key=parsed.routing_key).encode()
        body = pd_body(parsed, placement.pe.host, placement.pe.bootstrap_port, new_rooms(parsed), key)
        headers = {"Content-Type": "application/json"}
        if parsed.route != "generate":
            headers[ROUTING_KEY_HEADER] = key
        for name in ("Authorization", *FORWARDED_ID_HEADERS):
            if name in request.headers:
                headers[name] = request.headers[name]
        path = PATHS[parsed.route]
        prefill = asyncio.create_task(self._prefill_leg(placement, path, body, headers))
        # The prefill's answer matters only until the decode answers; it may finish in the background.
        self._background.add(prefill)
        prefill.add_done_callback(self._prefill_done)
        decode = asyncio.create_task(self._decode_head(placement.de, path, body, headers, parsed.stream))
        try:
            done, _ = await asyncio.wait({prefill, decode}, return_when=asyncio.FIRST_COMPLETED)
            if prefill in done and not _succeeded(decode):
                failure = prefill.exception()
                rejected = None if failure or prefill.result().status < 300 else prefill.result()
                if failure or rejected:
                    # Without its prefill, a decode waits for KV that never comes: abort it.
                    decode.cancel()
                    await asyncio.gather(decode, return_exceptions=True)
                    if failure:
                        raise failure
                    return _client_answer(rejected)
            try:
                head = await decode
            except BaseException:
                prefill.cancel()
                raise
            merge = await self._prefill_logprobs(parsed, prefill, head)
            if isinstance(head, Answer):
                e2e = time.monotonic() - started
                if head.status < 300:
                    self._observe_answer(head, e2e)
                    if merge is not None:
                        head = head._replace(body=msgspec.json.encode(merge(msgspec.json.decode(head.body))))
                return _client_answer(head)
            return await self._relay(request, placement.de, head, started, merge)
        finally:
            self.decider.release_decode(placement)

    @staticmethod
    async def _prefill_logprobs(parsed: ParsedRequest, prefill: asyncio.Task[Answer],
                                head: Answer | StreamHead) -> Callable[[Any], Any] | None:
        """With ``return_logprob`` on ``/generate``, the stock router puts the prefill's input logprobs in front
        of the decode's: the merge to apply to the decode's answer (or to each event of its stream)."""
        if parsed.route != "generate" or not _truthy(parsed.body.get("return_logprob")) or (
                isinstance(head, Answer) and head.status >= 300):
            return None
        try:
            answer = await prefill
            body = answer.body
            if body.startswith(b"data:"):  # a stream: its first event carries the input logprobs
                body = body.split(b"\n\n", 1)[0][5:].strip()
            first = msgspec.json.decode(body)
        except (EngineFailure, msgspec.DecodeError) as exc:
            log.warning("no input logprobs from the prefill to merge: %s", exc)
            return None
        return lambda decoded: merge_input_logprobs(first, decoded)

    def _prefill_done(self, task: asyncio.Task[Answer]) -> None:
        # A failure has been handled (retry) or reported (engine marked down) already; only collect it.
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("prefill leg ended with %s", task.exception())

    def _observe_answer(self, answer: Answer, e2e: float) -> None:
        response = None
        with contextlib.suppress(msgspec.DecodeError):
            response = msgspec.json.decode(answer.body)
        self.metrics.observe_completion(e2e, meta_ttft(response, e2e), output_tokens(response))

    async def _prefill_leg(self, placement: Placement, path: str, body: bytes,
                           headers: dict[str, str]) -> Answer:
        """The prefill's answer (a 4xx: it rejected the request); EngineFailure when it failed."""
        engine = placement.pe
        assert self.session is not None
        try:
            async with self.session.post(engine.url + path, data=body, headers=headers) as resp:
                data = await resp.read()
                _check_status(engine, resp.status, data)
                engine.record(True)
                return Answer(resp.status, resp.content_type, data)
        except _RETRIABLE as exc:
            raise self._failed(engine, exc) from exc
        except EngineFailure as exc:
            self.registry.mark_down(engine, str(exc))
            raise
        finally:
            self.decider.release_prefill(placement)

    async def _decode_head(self, engine: Engine, path: str, body: bytes, headers: dict[str, str],
                           stream: bool) -> Answer | StreamHead:
        """The decode's whole answer, or for a stream its response with the first chunk read."""
        assert self.session is not None
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await self.session.post(engine.url + path, data=body, headers=headers)
            if not stream or resp.status >= 300:
                data = await resp.read()
                _check_status(engine, resp.status, data)
                resp.release()
                engine.record(True)
                return Answer(resp.status, resp.content_type, data)
            first = await resp.content.readany()
            if not first:
                raise EngineFailure(engine, "closed the stream before its first chunk")
            engine.record(True)
            return StreamHead(resp, first)
        except _RETRIABLE as exc:
            if resp is not None:
                resp.close()
            raise self._failed(engine, exc) from exc
        except BaseException as exc:
            if resp is not None:
                resp.close()
            if isinstance(exc, EngineFailure):
                self.registry.mark_down(engine, str(exc))
            raise

    def _failed(self, engine: Engine, exc: BaseException) -> EngineFailure:
        failure = EngineFailure(engine, f"{type(exc).__name__}: {exc}")
        self.registry.mark_down(engine, str(failure))
        return failure

    async def _relay(self, request: web.Request, engine: Engine, head: StreamHead, started: float,
                     rewrite: Callable[[Any], Any] | None) -> web.StreamResponse:
        upstream = head.response
        out = web.StreamResponse(headers={"Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
                                          "Cache-Control": "no-cache", "x-request-id": request[REQUEST_ID]})
        tracker = SseTracker(rewrite)
        try:
            await out.prepare(request)
            ttft = time.monotonic() - started
            await out.write(tracker.feed(head.first_chunk))
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(tracker.feed(chunk))
            except _RETRIABLE as exc:
                self._failed(engine, exc)
                self.metrics.errors.labels("upstream_mid_stream").inc()
                error = {"error": {"message": f"decode server {engine.url} failed mid-stream: {exc}", "code": 502}}
                await out.write(b"data: " + msgspec.json.encode(error) + b"\n\n")
                await out.write_eof()
                return out
        finally:
            upstream.close()
        await out.write(tracker.rest())
        await out.write_eof()
        self.metrics.observe_completion(time.monotonic() - started, ttft, tracker.output_tokens())
        return out


def _truthy(flag: object) -> bool:
    """``return_logprob`` of one prompt or of a batch."""
    return any(flag) if isinstance(flag, list) else bool(flag)


def _succeeded(task: asyncio.Task[Answer | StreamHead]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _check_status(engine: Engine, status: int, data: bytes) -> None:
    if status >= 500:
        raise EngineFailure(engine, f"HTTP {status}: {data[:300].decode(errors='replace')}")


def _client_answer(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, content_type=answer.content_type or None)
