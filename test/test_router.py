"""The DualPath PD router against fake SGLang servers on 127.0.0.1 (router_fakes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from dualpath.kv import BlockBuffer, block_keys
from dualpath.router import PrefillSpec, RouterConfig, build_app, parse_args, to_argv
from dualpath.router.app import ROUTER, Router
from dualpath.router.store_view import KeyMemo, StoreView
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.scheduler.report import KVChannelAddress
from dualpath.scheduler.route_hint import ROUTING_KEY_HEADER
from dualpath.store import BlockStore, StoreConfig, StoreIndex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_fakes import FakeEngine, serving

TEST_DIR = Path(__file__).parent
BOOTSTRAP = 9100


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, bounded so that a hang fails instead of blocking CI."""
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 90))
    return wrapper


def router_config(prefill: list[FakeEngine], decode: list[FakeEngine], **overrides: Any) -> RouterConfig:
    options: dict[str, Any] = {"load_poll_interval_s": 0.05, "request_timeout_s": 20.0, "queue_timeout_s": 20.0,
                               "shutdown_drain_s": 10.0, **overrides}
    return RouterConfig(tuple(PrefillSpec(e.url, BOOTSTRAP + i) for i, e in enumerate(prefill)),
                        tuple(e.url for e in decode), **options)


@contextlib.asynccontextmanager
async def cluster(prefill: list[FakeEngine], decode: list[FakeEngine],
                  **overrides: Any) -> AsyncIterator[tuple[str, aiohttp.ClientSession, Router]]:
    """Fakes and an in-process router; yields the router's URL, a client session and the Router. A fake given a
    ``url`` already is not started (it comes up later, or never)."""
    for engine in prefill + decode:
        if not engine.url:
            await engine.start()
    try:
        app = build_app(router_config(prefill, decode, **overrides))
        async with serving(app) as url, aiohttp.ClientSession() as client:
            yield url, client, app[ROUTER]
    finally:
        for engine in prefill + decode:
            await engine.stop()


async def post(client: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with client.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Wait for a state change that has no event of its own to wait on (e.g. another process's)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = condition()
        if done if isinstance(done, bool) else await done:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


def pd_fakes(prefill: int = 1, decode: int = 1, **options: Any) -> tuple[list[FakeEngine], list[FakeEngine]]:
    return ([FakeEngine("prefill", f"p{i}", node=f"node-p{i}", **options) for i in range(prefill)],
            [FakeEngine("decode", f"d{i}", node=f"node-d{i}", **options) for i in range(decode)])


# ---- the PD protocol ------------------------------------------------------------------------------------


@run_async
async def test_both_legs_get_one_body_with_bootstrap_fields_and_a_fresh_room():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode) as (url, client, _):
        for i in range(12):
            status, reply = await post(client, f"{url}/generate", {"input_ids": [i, 1, 2, 3]})
            assert status == 200 and reply["engine"] == "d0"  # the decode's answer
        status, reply = await post(client, f"{url}/generate", {"input_ids": [[1, 2], [3, 4], [5, 6]]})
        assert status == 200
    sent_p, sent_d = prefill[0].received, decode[0].received
    assert [r.body for r in sent_p] == [r.body for r in sent_d]  # both legs: the same body
    rooms = [r.body["bootstrap_room"] for r in sent_p[:12]]
    assert len(set(rooms)) == 12 and all(0 <= room < 2**63 for room in rooms)
    for received in sent_p[:12]:
        assert received.body["bootstrap_host"] == "127.0.0.1" and received.body["bootstrap_port"] == BOOTSTRAP
        assert RouteHint.decode(received.body["routing_key"]) is not None
    batch = sent_p[12].body
    assert batch["bootstrap_port"] == [BOOTSTRAP] * 3 and len(set(batch["bootstrap_room"])) == 3
    assert batch["bootstrap_host"] == ["127.0.0.1"] * 3


@run_async
async def test_openai_routes_carry_the_hint_in_the_header_and_stream_the_decode_answer():
    prefill, decode = pd_fakes(output_tokens=5)
    async with cluster(prefill, decode) as (url, client, _):
        chat = {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        for path, body in (("/v1/completions", {"model": "tiny-model", "prompt": [5, 6, 7]}),
                           ("/v1/chat/completions", chat)):
            status, reply = await post(client, url + path, body)
            assert status == 200 and reply["engine"] == "d0" and reply["path"] == path
            async with client.post(url + path, json={**body, "stream": True}) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                events = [e for e in (await resp.read()).split(b"\n\n") if e]
            assert len(events) == 6 and events[-1] == b"data: [DONE]"
        async with client.get(f"{url}/metrics") as resp:
            page = await resp.text()
    # The streams give TTFT (first chunk) and TPOT (5 tokens, from the final chunk's usage); all four e2e.
    for line in ("dualpath_router_ttft_seconds_count 2.0", "dualpath_router_tpot_seconds_count 2.0",
                 "dualpath_router_e2e_seconds_count 4.0", "dualpath_router_queue_length 0.0"):
        assert line in page
    for p_leg, d_leg in zip(prefill[0].received, decode[0].received, strict=True):
        assert p_leg.body == d_leg.body and "routing_key" not in p_leg.body
        assert p_leg.headers[ROUTING_KEY_HEADER] == d_leg.headers[ROUTING_KEY_HEADER]
        assert RouteHint.decode(p_leg.headers[ROUTING_KEY_HEADER]).side is ReadSide.PE  # no store: nothing to read
        assert p_leg.body["bootstrap_port"] == BOOTSTRAP


# ---- the read side -------------------------------------------------------------------------------------


def store_prompt(root: Path, blocks: int) -> list[int]:
    """Write the Full Blocks of a prompt with the real store; returns the prompt (one token past them)."""
    ids = list(range(1000, 1000 + blocks * 64 + 1))
    with BlockStore(StoreConfig(root, "tiny", 64, node="writer", io_threads=1)) as store:
        buffer = BlockBuffer(store.layout, blocks)
        store.write(block_keys(ids, 64), buffer.blocks(range(blocks)))
    return ids


async def sides(client: aiohttp.ClientSession, url: str, ids: list[int], count: int) -> list[RouteHint]:
    hints = []
    for _ in range(count):
        status, _reply = await post(client, f"{url}/generate", {"input_ids": ids})
        assert status == 200
    async with client.get(f"{url}/dualpath/decisions", params={"last": str(count)}) as resp:
        for decision in (await resp.json())["decisions"]:
            hints.append(RouteHint.decode(decision["routing_key"]))
    return hints


@run_async
async def test_split_mode_shares_one_request_s_reads_between_idle_nodes_and_spares_a_busy_one(tmp_path):
    ids = store_prompt(tmp_path, blocks=4)
    prefill, decode = pd_fakes()
    channels = (KVChannelAddress.parse("agent-p0@127.0.0.1:7000"), KVChannelAddress.parse("agent-d0@127.0.0.1:7000"))
    # Reads so slow (10 tokens/s, alpha 30 tokens) that the PE's node alone would not read the hit within alpha.
    async with cluster(prefill, decode, store_root=tmp_path, mode="split", read_tokens_per_s=10.0) as (
            url, client, router):
        [hint] = await sides(client, url, ids, 1)
        hit = router.decider.decisions[-1]["cached_tokens"]
        # Both nodes idle, read at the same rate: each side reads about half, the PE's part in whole blocks.
        assert (hint.side, hint.pe_channel, hint.de_channel) == (ReadSide.SPLIT, *channels)
        assert abs(2 * hint.de_tokens - hit) <= 64 and (hit - hint.de_tokens) % 64 == 0
        prefill[0].queued_tokens = 50_000_000
        polls = router.registry.polls
        await until(lambda: router.registry.polls >= polls + 2, "two polls saw the busy PE node")
        assert await sides(client, url, ids, 2) == [RouteHint(ReadSide.DE, *channels)] * 2


@run_async
async def test_split_mode_has_an_idle_decode_node_help_read_another_de_s_request(tmp_path):
    ids = store_prompt(tmp_path, blocks=6)
    prefill, decode = pd_fakes(decode=2)
    async with cluster(prefill, decode, store_root=tmp_path, mode="split", read_tokens_per_s=10.0) as (
            url, client, router):
        [hint] = await sides(client, url, ids, 1)
        decision = router.decider.decisions[-1]
        hit, de = decision["cached_tokens"], decision["decode"]
        other = next(e for e in router.registry.decode if e.url != de)
        # Three idle nodes at one rate: the DE, the other DE (for the PE) and the PE each read a third.
        assert hint.side is ReadSide.SPLIT and hint.helper_channel == other.kv_channel != hint.de_channel
        assert [tokens for _, tokens in hint.plan.tokens(hit)] == [hit // 3] * 3
        # The reads just placed still count as queued (no poll has seen them drain): the next split is even too.
        [second] = await sides(client, url, ids, 1)
        assert second.helper_channel not in (None, second.de_channel)
        assert [tokens for _, tokens in second.plan.tokens(hit)] == [tokens for _, tokens in hint.plan.tokens(hit)]


@pytest.mark.parametrize("mode", ["dualpath", "baseline"])
@run_async
async def test_reads_go_to_the_side_with_the_shorter_read_queue_except_in_baseline(tmp_path, mode):
    ids = store_prompt(tmp_path, blocks=4)
    prefill, decode = pd_fakes()
    prefill[0].queued_tokens = 50_000_000  # far above the decode node's queue (and alpha)
    async with cluster(prefill, decode, store_root=tmp_path, mode=mode) as (
            url, client, router):
        hints = await sides(client, url, ids, 3)
        if mode == "baseline":
            assert [h.side for h in hints] == [ReadSide.PE] * 3
        else:
            assert hints == [RouteHint(ReadSide.DE, KVChannelAddress.parse("agent-p0@127.0.0.1:7000"),
                                       KVChannelAddress.parse("agent-d0@127.0.0.1:7000"))] * 3
        decisions = list(router.decider.decisions)
        assert [d["cached_tokens"] for d in decisions] == [4 * 64] * 3 and decisions[0]["new_tokens"] == 1
        # Now the decode node is the busy one: reads move back to the PE side once a poll has seen it.
        prefill[0].queued_tokens, decode[0].queued_tokens = 0, 50_000_000
        polls = router.registry.polls
        await until(lambda: router.registry.polls >= polls + 2, "two polls saw the new queues")
        assert [h.side for h in await sides(client, url, ids, 2)] == [ReadSide.PE] * 2
        status, _ = await post(client, f"{url}/generate", {"text": "a text prompt has no hit estimate"})
        assert status == 200 and router.decider.decisions[-1]["planned_side"] == "none"
        async with client.get(f"{url}/metrics") as resp:
            page = await resp.text()
    assert 'dualpath_storage_read_queue_tokens{node="node-d0"} 5e+07' in page
    assert 'dualpath_storage_read_bytes_total{node="node-p0"}' in page
    expected = {"pe": 6} if mode == "baseline" else {"pe": 3, "de": 3}
    for side, count in expected.items():
        assert f'dualpath_router_requests_total{{model="default",side="{side}"}} {count}.0' in page
    assert ('side="de"' in page) == (mode == "dualpath")


@run_async
async def test_a_burst_spreads_over_both_sides_while_the_node_reports_lag(tmp_path):
    # The fakes read nothing, so every poll reports empty queues, as real nodes do before their reads of a
    # burst are queued. The reads the router placed still count until the NIC can have done them (here
    # never: 1 token/s), so a burst alternates sides instead of sending everything to the reporting-empty one.
    ids = store_prompt(tmp_path, blocks=4)
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode, store_root=tmp_path, read_tokens_per_s=1.0) as (url, client, router):
        hints = []
        for _ in range(4):
            polls = router.registry.polls
            await until(lambda polls=polls: router.registry.polls > polls, "a poll reported the (empty) queues")
            hints += await sides(client, url, ids, 1)
    assert [h.side for h in hints] == [ReadSide.PE, ReadSide.DE, ReadSide.PE, ReadSide.DE]
    assert router.decider._placed_reads.pending(router.registry.node_ids["node-p0"], time.monotonic()) > 0


@run_async
async def test_a_stock_server_never_gets_the_decode_side_and_the_namespace_comes_when_published(tmp_path):
    ids = store_prompt(tmp_path, blocks=2)
    # The prefill publishes its store namespace only once SGLang has built its host pool.
    prefill = [FakeEngine("prefill", "p0", node="node-p0", store_namespace="")]
    decode = [FakeEngine("decode", "d0", dualpath=False)]  # stock SGLang: no /dualpath/info
    prefill[0].queued_tokens = 50_000_000  # the scheduler will want the decode's side
    async with cluster(prefill, decode, store_root=tmp_path) as (url, client, router):
        hints = await sides(client, url, ids, 1)
        prefill[0].store_namespace = "tiny-64t"
        await until(lambda: router.registry.store_namespace == "tiny-64t", "the router learnt the namespace")
        hints += await sides(client, url, ids, 2)
    assert [h.side for h in hints] == [ReadSide.PE] * 3
    decisions = list(router.decider.decisions)
    assert [d["cached_tokens"] for d in decisions] == [0, 128, 128]
    assert [d["planned_side"] for d in decisions] == ["none", "de", "de"]  # planned, but not sent


@run_async
async def test_a_decode_with_another_tensor_parallel_size_never_reads_for_the_prefill(tmp_path):
    ids = store_prompt(tmp_path, blocks=2)
    prefill = [FakeEngine("prefill", "p0", node="node-p0", queued_tokens=50_000_000)]  # the DE side is wanted
    decode = [FakeEngine("decode", "d0", node="node-d0", tp_size=2)]
    async with cluster(prefill, decode, store_root=tmp_path) as (url, client, router):
        hints = await sides(client, url, ids, 2)
        decode[0].tp_size = 1  # restarted at the prefill's size: DE-side reads again
        await until(lambda: router.registry.decode[0].tp_size == 1, "the router saw the new report")
        hints += await sides(client, url, ids, 1)
    assert [h.side for h in hints] == [ReadSide.PE, ReadSide.PE, ReadSide.DE]
    assert [d["planned_side"] for d in router.decider.decisions][1:] == ["de", "de"]


# ---- waiting, errors, failures -------------------------------------------------------------------------


@run_async
async def test_requests_wait_while_every_prefill_is_above_beta_and_resume_on_completion():
    gate = asyncio.Event()
    prefill, decode = [FakeEngine("prefill", "p0", gate=gate)], [FakeEngine("decode", "d0")]
    # beta = 5 s x 200 tokens/s = 1,000 tokens: a second 800-token request still fits, a third does not.
    async with cluster(prefill, decode, gpu_tokens_per_s=200.0) as (url, client, router):
        calls = [asyncio.create_task(post(client, f"{url}/generate", {"input_ids": [7] * 800})) for _ in range(3)]
        await prefill[0].wait_received(2)
        await until(lambda: router.decider.waiting == 1, "the third request waits")
        assert len(prefill[0].received) == 2 and router.registry.prefill[0].tokens == 1600
        gate.set()
        results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * 3
    assert len(prefill[0].received) == 3 and router.decider.waiting == 0


@run_async
async def test_bad_requests_get_4xx_with_a_message_and_the_router_keeps_serving():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode, max_body_bytes=4096) as (url, client, _):
        cases: list[tuple[str, bytes, int, str]] = [
            ("/generate", b"{not json", 400, "not valid JSON"),
            ("/generate", b"[1, 2]", 400, "JSON object"),
            ("/generate", b'{"sampling_params": {}}', 400, "exactly one of 'text' and 'input_ids'"),
            ("/generate", b'{"input_ids": "text"}', 400, "'text' takes strings"),
            ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": -1}}', 400, "max_new_tokens"),
            ("/v1/completions", b'{"model": "tiny-model"}', 400, "needs a 'prompt'"),
            ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "'gpt-9' is not served"),
            ("/v1/chat/completions", b'{"messages": []}', 400, "'messages'"),
            ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "stream": "yes"}', 400, "'stream'"),
            ("/generate", b'{"text": "x", "sampling_params": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400,
             "nested too deeply"),
            ("/generate", b'{"text": "' + b"x" * 5000 + b'"}', 413, "4096"),
            ("/no/such/route", b"{}", 404, ""),
        ]
        for path, raw, status, message in cases:
            async with client.post(url + path, data=raw, headers={"Content-Type": "application/json"}) as resp:
                error = (await resp.json())["error"]
                assert (resp.status, error["code"]) == (status, status), (path, raw[:40])
                assert message in error["message"]
            status_ok, reply = await post(client, f"{url}/v1/completions", {"model": "tiny-model", "prompt": "ok"})
            assert status_ok == 200 and reply["engine"] == "d0"
        async with client.get(f"{url}/metrics") as resp:
            page = await resp.text()
    assert 'dualpath_router_errors_total{kind="too_large"} 1.0' in page
    assert 'dualpath_router_errors_total{kind="unknown_model"} 1.0' in page
    assert len(decode[0].received) == len(cases)  # only the valid requests reached an engine


@run_async
async def test_no_engine_with_room_answers_503_within_the_queue_timeout():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode, queue_timeout_s=0.3) as (url, client, router):
        await prefill[0].stop()
        await until(lambda: not router.registry.prefill[0].up, "the poller saw the prefill go")
        status, reply = await post(client, f"{url}/generate", {"text": "anyone?"})
        async with client.get(f"{url}/readiness") as resp:
            health = resp.status
    assert status == 503 and "no prefill/decode pair had room" in reply["error"]["message"]
    assert health == 503


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def engine_running(client: aiohttp.ClientSession, url: str) -> int:
    with contextlib.suppress(aiohttp.ClientError):
        async with client.get(f"{url}/v1/loads") as resp:
            return (await resp.json())["loads"][0]["num_running_reqs"]
    return -1


@run_async
async def test_a_decode_killed_mid_request_is_retried_on_another_decode():
    port = free_port()
    doomed = subprocess.Popen([sys.executable, str(TEST_DIR / "router_fakes.py"), "--role", "decode",
                               "--name", "doomed", "--port", str(port), "--hold"])
    try:
        prefill = [FakeEngine("prefill", "p0")]
        survivor = FakeEngine("decode", "survivor", extra_reqs=4, extra_tokens=5000)  # busier: chosen second
        await prefill[0].start()
        await survivor.start()
        async with aiohttp.ClientSession() as probe:
            url_doomed = f"http://127.0.0.1:{port}"

            async def doomed_holds(count: int) -> bool:
                return await engine_running(probe, url_doomed) >= count

            await until(lambda: doomed_holds(0), "the doomed decode answers")
            config = RouterConfig((PrefillSpec(prefill[0].url, BOOTSTRAP),), (url_doomed, survivor.url),
                                  load_poll_interval_s=0.05, request_timeout_s=20.0)
            async with serving(build_app(config)) as url:
                plain = asyncio.create_task(post(probe, f"{url}/generate", {"input_ids": [1] * 100}))
                streamed = asyncio.create_task(probe.post(f"{url}/v1/completions",
                                                          json={"prompt": [2] * 100, "stream": True}))
                await until(lambda: doomed_holds(2), "both requests reached the doomed decode")
                doomed.kill()
                status, reply = await plain
                async with await streamed as resp:
                    stream_status, events = resp.status, (await resp.read()).split(b"\n\n")
                async with probe.get(f"{url}/metrics") as resp:
                    page = await resp.text()
        assert (status, reply["engine"]) == (200, "survivor")
        assert stream_status == 200 and b'"engine": "survivor"' in events[0] and b"data: [DONE]" in events
        assert "dualpath_router_retries_total 2.0" in page
        assert len(survivor.received) == 2
    finally:
        doomed.kill()
        doomed.wait()
        for engine in (prefill[0], survivor):
            await engine.stop()


@run_async
async def test_a_failing_prefill_aborts_its_waiting_decode_leg_and_the_request_moves_to_another_pair():
    gate = asyncio.Event()
    failing = FakeEngine("prefill", "failing", fail_status=500)
    healthy = FakeEngine("prefill", "healthy", extra_tokens=5000)  # busier: the scheduler tries "failing" first
    decode = FakeEngine("decode", "d0", gate=gate)
    async with cluster([failing, healthy], [decode]) as (url, client, router):
        call = asyncio.create_task(post(client, f"{url}/generate", {"input_ids": [3] * 50}))
        # The first decode leg waits for KV that the failed prefill never sends: only if the router aborts
        # it and places the request again does a second leg arrive.
        await decode.wait_received(2)
        gate.set()
        status, reply = await call
    assert (status, reply["engine"]) == (200, "d0")
    assert [d["prefill"] for d in router.decider.decisions] == [failing.url, healthy.url]  # one per attempt
    assert [len(failing.received), len(healthy.received)] == [1, 1]
    rooms = [r.body["bootstrap_room"] for r in decode.received]
    assert rooms[1] == healthy.received[0].body["bootstrap_room"] != rooms[0]


@run_async
async def test_soak_of_1000_requests_from_32_clients_loses_none():
    prefill, decode = pd_fakes(prefill=2, decode=2, output_tokens=3)
    async with cluster(prefill, decode) as (url, client, router):
        async def agent(agent_id: int) -> list[int]:
            statuses = []
            for turn, _ in enumerate(range(agent_id, 1000, 32)):  # request n goes to agent n % 32
                if turn % 3 == 0:
                    async with client.post(f"{url}/v1/completions",
                                           json={"prompt": [agent_id] * (10 + turn), "stream": True}) as resp:
                        body = await resp.read()
                        statuses.append(resp.status if body.endswith(b"data: [DONE]\n\n") else -1)
                else:
                    status, reply = await post(client, f"{url}/generate", {"input_ids": [agent_id] * (10 + turn)})
                    statuses.append(status if reply["engine"] in ("d0", "d1") else -1)
            return statuses

        results = [s for statuses in await asyncio.gather(*(agent(a) for a in range(32))) for s in statuses]
        assert len(results) == 1000 and results == [200] * 1000
        assert len(router.decider.decisions) == 1000  # exactly one decision per request
        assert {d["request_id"] for d in router.decider.decisions} == set(range(1000))
        await until(lambda: all(e.inflight_reqs == 0 for e in router.registry.engines), "every leg was released")
    assert sum(len(e.received) for e in prefill) == sum(len(e.received) for e in decode) == 1000
    assert all(len(e.received) > 100 for e in prefill + decode)  # both pairs did real work


@run_async
async def test_sigterm_drains_every_accepted_request_then_the_router_restarts(tmp_path):
    gate = asyncio.Event()
    prefill, decode = [FakeEngine("prefill", "p0")], [FakeEngine("decode", "d0", gate=gate)]
    for engine in prefill + decode:
        await engine.start()
    port = free_port()
    argv = to_argv(router_config(prefill, decode, port=port))
    log_path = tmp_path / "router.log"

    def start_router() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "dualpath.launch_router", *argv], stdout=log, stderr=log)

    async def healthy(client: aiohttp.ClientSession) -> bool:
        # A connect racing the listener's close can stall (a dropped SYN is resent after 1 s, then 3 s, ...): the
        # probe gives up early, so that the held requests are released well within the router's drain.
        probe = aiohttp.ClientTimeout(total=0.5)
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with client.get(f"http://127.0.0.1:{port}/readiness", timeout=probe) as resp:
                return resp.status == 200
        return False

    router = start_router()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
            while not await healthy(client):
                assert router.poll() is None, log_path.read_text()
                await asyncio.sleep(0.05)
            url = f"http://127.0.0.1:{port}"
            calls = [asyncio.create_task(post(client, f"{url}/generate", {"input_ids": [i] * 8})) for i in range(16)]
            await decode[0].wait_received(16)  # all accepted and dispatched
            router.send_signal(signal.SIGTERM)
            while await healthy(client):  # the listener closes; the accepted requests are still held
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # hold them a while: a router that did not drain would cut them now
            assert router.poll() is None
            gate.set()
            results = await asyncio.gather(*calls)
            assert sorted(reply["bootstrap_room"] for _, reply in results) == sorted(
                r.body["bootstrap_room"] for r in decode[0].received)
            assert [status for status, _ in results] == [200] * 16
            assert await asyncio.to_thread(router.wait, 20) == 0
            router = start_router()  # the same port again, at once
            while not await healthy(client):
                assert router.poll() is None, log_path.read_text()
                await asyncio.sleep(0.05)
            status, reply = await post(client, f"{url}/generate", {"input_ids": [1, 2]})
            assert (status, reply["engine"]) == (200, "d0")
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(20)
        for engine in prefill + decode:
            await engine.stop()


# ---- pieces --------------------------------------------------------------------------------------------

urls = st.builds(lambda port: f"http://127.0.0.1:{port}", st.integers(1, 65535))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill=st.lists(st.tuples(urls, st.one_of(st.none(), st.integers(1, 65535))), min_size=1, max_size=3,
                       unique_by=lambda p: p[0]),
       decode=st.lists(urls, min_size=1, max_size=3, unique=True),
       mode=st.sampled_from(["dualpath", "baseline"]), poll=st.floats(0.01, 5.0), retries=st.integers(0, 3),
       store=st.one_of(st.none(), st.just(Path("/tmp/store"))), block=st.one_of(st.none(), st.sampled_from([16, 64])),
       namespace=st.one_of(st.none(), st.just("sglang-tiny-bfloat16-64t")))
def test_the_command_line_round_trips(prefill, decode, mode, poll, retries, store, block, namespace):
    if {u for u, _ in prefill} & set(decode):
        return
    config = RouterConfig(tuple(PrefillSpec(u, p) for u, p in prefill), tuple(decode), mode=mode,
                          load_poll_interval_s=poll, max_retries=retries, store_root=store, store_block_tokens=block,
                          store_namespace=namespace)
    assert parse_args(to_argv(config)) == config


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(total=st.integers(0, 12), stored=st.integers(0, 12))
def test_the_stored_prefix_matches_the_block_store(tmp_path, total, stored):
    stored = min(stored, total)
    root = tmp_path / f"s{total}-{stored}-{os.urandom(4).hex()}"
    ids = np.random.default_rng(total * 13 + stored).integers(0, 50_000, total * 16 + 5).tolist()
    keys = block_keys(ids, 16)
    with BlockStore(StoreConfig(root, "tiny", 16, node="n", io_threads=1)) as store:
        if stored:
            store.write(keys[:stored], BlockBuffer(store.layout, stored).blocks(range(stored)))
        view = StoreView(root)
        namespace = store.config.namespace
        assert view.index.stored_prefix(keys, namespace) == store.prefix_length(keys) == stored
        assert view.hit_tokens(array("I", ids), namespace, 16) == stored * 16
        assert StoreIndex(root).namespaces() == [namespace]


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200), st.integers(0, 5)), min_size=1, max_size=12),
       capacity=st.integers(1, 40), block=st.sampled_from([1, 4, 16]))
def test_memoised_keys_equal_the_block_keys(turns, capacity, block):
    """Sessions that extend their previous prompt (sometimes editing a token) get the keys of a fresh hash."""
    memo = KeyMemo(block, capacity)
    sessions: dict[int, list[int]] = {}
    for session, grow, edit in turns:
        prompt = sessions.setdefault(session, [session] * block)
        prompt += [(session * 7 + i) % 50_000 for i in range(len(prompt), len(prompt) + grow)]
        if edit:
            prompt[len(prompt) // (edit + 1)] += 1
        assert memo.keys(array("I", prompt)) == block_keys(prompt, block)
        assert len(memo) <= capacity
