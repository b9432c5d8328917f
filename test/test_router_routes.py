"""The stock router's service routes on the DualPath router, with sglang-router 0.3.2's semantics (taken from
the real package), against fake SGLang servers on 127.0.0.1 (router_fakes.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from dualpath.router.breaker import BreakerConfig, BreakerState, CircuitBreaker
from dualpath.router.protocol import merge_input_logprobs
from dualpath.scheduler.route_hint import ROUTING_KEY_HEADER, RouteHint
from dualpath.srt.state import METRICS
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import FakeEngine
from test_router import cluster, free_port, pd_fakes, post, router_config, run_async, until


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        text = await resp.text()
        return resp.status, (await resp.json(content_type=None)) if text.startswith(("{", "[")) else text


@run_async
async def test_liveness_answers_while_the_workers_load_and_readiness_once_a_pair_is_up():
    prefill, decode = pd_fakes()
    decode[0].url = f"http://127.0.0.1:{free_port()}"  # not listening yet, as SGLang while its model loads
    async with cluster(prefill, decode) as (url, client, router):
        assert await get(client, f"{url}/liveness") == (200, "OK")
        assert await get(client, f"{url}/health") == (200, "OK")  # a liveness probe must not restart the router
        status, body = await get(client, f"{url}/readiness")
        assert (status, body) == (503, {"status": "not ready", "reason": "insufficient healthy workers"})
        assert (await get(client, f"{url}/health_generate"))[0] == 503
        assert (await get(client, f"{url}/get_model_info"))[0] == 200  # the prefill's, which is up
        await decode[0].start(urlsplit(decode[0].url).port)
        await until(lambda: router.registry.decode[0].up, "the poller found the decode")
        status, body = await get(client, f"{url}/readiness")
        assert (status, body) == (200, {"status": "ready", "healthy_workers": 2, "total_workers": 2})
        assert (await get(client, f"{url}/health_generate"))[0] == 200


@run_async
async def test_info_models_and_loads_routes():
    prefill, decode = pd_fakes(2, 1)
    async with cluster(prefill, decode) as (url, client, router):
        status, info = await get(client, f"{url}/get_model_info")
        assert status == 200 and info["served_by"] in ("p0", "p1") and info["model_path"] == "tiny-model"
        status, info = await get(client, f"{url}/get_server_info")
        assert status == 200 and info["workers_count"] == 3 and info["decode"] == [decode[0].url]
        assert await get(client, f"{url}/v1/models") == (200, {"object": "list", "data": [
            {"id": "tiny-model", "object": "model", "owned_by": "sglang"}]})
        decode[0].extra_reqs = 3
        await until(lambda: router.registry.decode[0].seq == 3, "the poll saw the decode's load")
        status, loads = await get(client, f"{url}/get_loads")
        assert status == 200 and {"worker": decode[0].url, "load": 3} in loads["workers"] and len(loads["workers"]) == 3
        for engine in prefill:
            await engine.stop()
        await until(lambda: not any(e.up for e in router.registry.prefill), "the poller saw the prefills go")
        assert (await get(client, f"{url}/get_model_info"))[0] == 503


@run_async
async def test_flush_cache_reaches_every_worker_and_names_the_ones_that_failed():
    prefill, decode = pd_fakes(1, 2)
    async with cluster(prefill, decode) as (url, client, _):
        status, body = await post(client, f"{url}/flush_cache", {})
        assert status == 200 and body["workers_flushed"] == 3 and body["status"] == "success"
        assert [e.flushes for e in prefill + decode] == [1, 1, 1]
        await decode[1].stop()
        status, body = await post(client, f"{url}/flush_cache", {})
        assert status == 502 and body["workers_flushed"] == 2 and decode[1].url in body["message"]
        assert [e.flushes for e in prefill + decode] == [2, 2, 1]


@run_async
async def test_workers_join_and_leave_while_serving_and_the_scheduler_follows():
    prefill, decode = pd_fakes(1, 1)
    extra = pd_fakes(0, 2)[1][1]
    await extra.start()
    try:
        async with cluster(prefill, decode) as (url, client, router):
            status, listed = await get(client, f"{url}/workers")
            assert status == 200 and listed["total"] == 2 and listed["stats"]["decode_count"] == 1
            status, added = await post(client, f"{url}/workers", {"url": extra.url, "worker_type": "decode"})
            assert status == 202 and added["location"] == f"/workers/{added['worker_id']}"
            assert (await post(client, f"{url}/workers", {"url": extra.url, "worker_type": "decode"}))[0] == 409
            assert (await post(client, f"{url}/workers", {"url": "nowhere", "worker_type": "decode"}))[0] == 400
            assert (await post(client, f"{url}/workers", {"url": extra.url, "worker_type": "router"}))[0] == 400
            await until(lambda: router.registry.decode[1].up, "the poller found the new decode")
            shown = (await get(client, f"{url}/workers/{added['worker_id']}"))[1]
            assert (shown["url"], shown["worker_type"], shown["is_healthy"]) == (extra.url, "decode", True)
            decode[0].extra_reqs = 50  # busy: the scheduler now prefers the new decode
            await until(lambda: router.registry.decode[0].seq == 50, "the poll saw the load")
            status, reply = await post(client, f"{url}/generate", {"input_ids": [1, 2, 3]})
            assert (status, reply["engine"]) == (200, extra.name)

            old = router.registry.decode[0].worker_id
            async with client.delete(f"{url}/workers/{added['worker_id']}") as resp:
                assert resp.status == 202
            for _ in range(3):  # only the remaining decode serves, however busy it is
                status, reply = await post(client, f"{url}/generate", {"input_ids": [4, 5]})
                assert (status, reply["engine"]) == (200, "d0")
            async with client.delete(f"{url}/workers/{old}") as resp:  # the last decode stays
                assert resp.status == 409 and "last decode" in (await resp.json())["error"]["message"]
            async with client.delete(f"{url}/workers/{added['worker_id']}") as resp:
                assert resp.status == 404
            assert (await get(client, f"{url}/workers"))[1]["total"] == 2
    finally:
        await extra.stop()


@run_async
async def test_request_ids_are_answered_and_forwarded_as_the_stock_router_does():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode) as (url, client, _):
        async def send(headers: dict[str, str], body: Any = None) -> str:
            async with client.post(f"{url}/generate", json=body or {"input_ids": [1, 2]}, headers=headers) as resp:
                await resp.read()
                return resp.headers["x-request-id"]

        assert await send({"X-Request-Id": "client-1"}) == "client-1"
        assert await send({"X-Correlation-Id": "corr-2"}) == "corr-2"
        assert await send({"X-Trace-Id": "trace-3"}) == "trace-3"
        assert (await send({})).startswith("gnt-")
        assert await send({"X-Request-Id": "stream-4"}, {"input_ids": [3], "stream": True}) == "stream-4"
        async with client.post(f"{url}/generate", data=b"{bad", headers={"X-Request-Id": "bad-5"}) as resp:
            assert (resp.status, resp.headers["x-request-id"]) == (400, "bad-5")
        for engine in prefill + decode:  # both legs get x-request-id and x-correlation-id as sent, nothing else
            got = [{k.lower(): v for k, v in r.headers.items() if "-id" in k.lower()} for r in engine.received]
            assert got == [{"x-request-id": "client-1"}, {"x-correlation-id": "corr-2"}, {}, {},
                           {"x-request-id": "stream-4"}]


@run_async
async def test_the_prefills_input_logprobs_are_merged_in_front_of_the_decodes():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode) as (url, client, _):
        status, reply = await post(client, f"{url}/generate", {"input_ids": [5, 6, 7], "return_logprob": True})
        assert status == 200
        assert reply["meta_info"]["input_token_logprobs"] == [[-1.0, 5, None], [-1.0, 6, None], [-1.0, 7, None],
                                                              [-2.0, 7, None]]
        async with client.post(f"{url}/generate", json={"input_ids": [8, 9], "return_logprob": True,
                                                         "stream": True}) as resp:
            events = [line[5:].strip() for line in (await resp.text()).split("\n\n") if line.startswith("data:")]
        merged = [json.loads(event)["meta_info"]["input_token_logprobs"] for event in events if event != "[DONE]"]
        assert len(merged) == 4 and all(m == [[-1.0, 8, None], [-1.0, 9, None], [-2.0, 9, None]] for m in merged)
        status, plain = await post(client, f"{url}/generate", {"input_ids": [5, 6, 7]})  # negative control
        assert status == 200 and "input_token_logprobs" not in plain["meta_info"]


def test_a_batch_merges_item_by_item_and_leaves_answers_without_logprobs_alone():
    prefill = [{"meta_info": {"input_token_logprobs": [[-1.0, 1, None]]}},
               {"meta_info": {"input_token_logprobs": [[-1.0, 2, None], [-1.0, 3, None]]}}]
    decode = [{"meta_info": {"input_token_logprobs": [[-2.0, 1, None]]}}, {"meta_info": {}}]
    merged = merge_input_logprobs(prefill, decode)
    assert merged == [{"meta_info": {"input_token_logprobs": [[-1.0, 1, None], [-2.0, 1, None]]}}, {"meta_info": {}}]
    assert merge_input_logprobs({"meta_info": {}}, {"text": "x"}) == {"text": "x"}


def metric_labels(page: str, prefix: str) -> dict[str, set[str]]:
    """Metric family name -> label names of its samples (histogram buckets' ``le`` left out)."""
    return {family.name: {label for sample in family.samples for label in sample.labels if label != "le"}
            for family in text_string_to_metric_families(page) if family.name.startswith(prefix)}


async def traffic(client: aiohttp.ClientSession, url: str) -> None:
    """A plain, a streamed, a chat and a malformed request."""
    for body in ({"input_ids": [1, 2, 3]}, {"input_ids": [1], "stream": True}):
        async with client.post(f"{url}/generate", json=body) as resp:
            await resp.read()
    chat = {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}]}
    async with client.post(f"{url}/v1/chat/completions", json=chat) as resp:
        await resp.read()
    async with client.post(f"{url}/generate", data=b"{bad", headers={"Content-Type": "application/json"}) as resp:
        await resp.read()


@run_async
async def test_the_stock_routers_metrics_have_its_names_and_labels():
    # The stock router's own page, after the same traffic against the same fakes.
    prefill, decode = pd_fakes()
    for engine in prefill + decode:
        await engine.start()
    port, metrics_port = free_port(), free_port()
    stock = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                              "--prefill", prefill[0].url, "9000", "--decode", decode[0].url, "--host", "127.0.0.1",
                              "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port",
                              str(metrics_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as client:
            await until(lambda: ready(client, f"http://127.0.0.1:{port}"), "the stock router is ready", 30)
            await traffic(client, f"http://127.0.0.1:{port}")
            async with client.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                theirs = metric_labels(await resp.text(), "smg_")
    finally:
        stock.terminate()
        stock.wait(20)
        for engine in prefill + decode:
            await engine.stop()
            engine.url, engine.received = "", []
    async with cluster(prefill, decode) as (url, client, _):
        await traffic(client, url)
        async with client.get(f"{url}/metrics") as resp:
            page = await resp.text()
    ours = metric_labels(page, "smg_")
    assert {name: theirs.get(name) for name in ours} == ours  # every smg_ metric we export is stock's, same labels
    assert len(ours) >= 9
    assert 'smg_router_requests_total{backend_type="pd",connection_mode="http",endpoint="generate",model="default",' \
           'router_type="http",streaming="true"} 1.0' in page
    assert 'smg_worker_selection_total{connection_mode="http",model="tiny-model",policy="dualpath",' \
           'worker_type="decode"} 1.0' in page
    assert 'smg_http_responses_total{error_code="bad_request",status_code="400"} 1.0' in page
    assert f'smg_worker_health{{worker="{decode[0].url}"}} 1.0' in page


async def ready(client: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with client.get(f"{url}/readiness") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


@run_async
async def test_the_grafana_dashboard_queries_only_metrics_the_router_and_servers_export():
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana" / "dualpath.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:dualpath|smg)_[a-z_]+", target["expr"])}
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode) as (url, client, _):
        await traffic(client, url)
        async with client.get(f"{url}/metrics") as resp:
            page = await resp.text()
    exported = {sample.name for family in text_string_to_metric_families(page) for sample in family.samples}
    exported |= {f"{name}_total" for name, _, _ in METRICS.values()}  # the servers' counters (SGLang's /metrics)
    assert len(queried) >= 10 and queried <= exported, queried - exported
    assert "dualpath_storage_read_bytes_total" in queried and "dualpath_router_hit_tokens_total" in queried


def test_the_circuit_breaker_opens_half_opens_and_closes_as_configured():
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, success_threshold=2, open_s=10.0, window_s=5.0))
    assert not breaker.record(False, 0.0) and not breaker.record(False, 3.0)
    assert not breaker.record(False, 6.0)  # the first failure left the 5 s window: two recent ones
    assert breaker.record(False, 7.5) and breaker.state is BreakerState.OPEN and not breaker.allows
    assert not breaker.tick(17.4) and breaker.tick(17.5) and breaker.state is BreakerState.HALF_OPEN
    assert breaker.allows and breaker.record(False, 18.0) and breaker.state is BreakerState.OPEN  # one failure
    assert breaker.tick(28.0) and not breaker.record(True, 28.1) and breaker.record(True, 28.2)
    assert breaker.state is BreakerState.CLOSED and (breaker.successes, breaker.failures) == (2, 5)
    disabled = CircuitBreaker(BreakerConfig(failure_threshold=1, enabled=False))
    disabled.record(False, 0.0)
    assert disabled.allows  # --disable-circuit-breaker


def test_retry_backoff_grows_by_the_multiplier_up_to_the_cap_with_bounded_jitter():
    config = router_config([FakeEngine("prefill", "p", url="http://127.0.0.1:1")],
                           [FakeEngine("decode", "d", url="http://127.0.0.1:2")], retry_initial_backoff_ms=100,
                           retry_max_backoff_ms=300, retry_backoff_multiplier=2.0, retry_jitter_factor=0.0)
    assert [config.backoff_s(retry) for retry in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    jittered = dataclasses.replace(config, retry_jitter_factor=0.2)
    waits = [jittered.backoff_s(1) for _ in range(200)]
    assert 0.08 <= min(waits) < max(waits) <= 0.12


@run_async
async def test_a_server_that_answers_polls_but_fails_requests_is_skipped_once_its_breaker_opens():
    for enabled in (True, False):  # without the breaker (negative control) it keeps getting requests
        prefill = pd_fakes()[0]
        decode = [FakeEngine("decode", "bad", node="node-bad", fail_status=500), FakeEngine("decode", "good")]
        breaker = BreakerConfig(failure_threshold=2, open_s=60.0, enabled=enabled)
        async with cluster(prefill, decode, breaker=breaker, max_retries=3, retry_initial_backoff_ms=0,
                           retry_jitter_factor=0.0, report_timeout_s=0.2) as (url, client, router):
            bad = router.registry.decode[0]
            for i in range(12):
                await until(lambda: all(e.up for e in router.registry.engines), "the polls found every server")
                decode[1].extra_reqs, decode[1].extra_tokens = 100, 100_000  # busy: the bad one is preferred
                await until(lambda: router.registry.decode[1].tokens >= 100_000, "the poll saw the load")
                status, _ = await post(client, f"{url}/generate", {"input_ids": [i + 1]})
                assert status == 200  # retried on the good decode
            async with client.get(f"{url}/metrics") as resp:
                page = await resp.text()
        if enabled:
            assert len(decode[0].received) == 2 and bad.breaker.state is BreakerState.OPEN
            assert f'smg_worker_cb_state{{worker="{decode[0].url}"}} 1.0' in page
        else:
            assert len(decode[0].received) == 12 and bad.breaker.state is BreakerState.CLOSED


@run_async
async def test_a_clients_own_routing_key_travels_inside_the_hint():
    prefill, decode = pd_fakes()
    async with cluster(prefill, decode) as (url, client, _):
        status, _ = await post(client, f"{url}/generate", {"input_ids": [1, 2], "routing_key": "session-7;x=y"})
        assert status == 200
        chat = {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}]}
        async with client.post(f"{url}/v1/chat/completions", json=chat, headers={ROUTING_KEY_HEADER: "chat-9"}) as resp:
            assert resp.status == 200
        status, _ = await post(client, f"{url}/generate", {"input_ids": [3]})
        status_bad, reply = await post(client, f"{url}/generate", {"input_ids": [1], "routing_key": 5})
    assert status_bad == 400 and "routing_key" in reply["error"]["message"]
    for engine in prefill + decode:
        keys = [RouteHint.decode(r.body.get("routing_key") or r.headers.get(ROUTING_KEY_HEADER)).client_key
                for r in engine.received]
        assert keys == ["session-7;x=y", "chat-9", ""]


@run_async
async def test_a_client_that_goes_away_mid_stream_frees_its_decode_and_the_router_serves_on():
    prefill, decode = pd_fakes(1, 1, output_tokens=200, chunk_delay_s=0.02)
    async with cluster(prefill, decode) as (url, client, router):
        async with aiohttp.ClientSession() as leaving, leaving.post(
                f"{url}/generate", json={"input_ids": [1, 2], "stream": True}) as resp:
            assert (await resp.content.readline()).startswith(b"data:")
            resp.connection.transport.abort()  # the client is gone after its first token
        await until(lambda: decode[0].streams_cut == 1, "the decode's stream was cut")
        await until(lambda: all(e.inflight_reqs == 0 for e in router.registry.engines), "its legs were released")
        decode[0].output_tokens = 4
        status, reply = await post(client, f"{url}/generate", {"input_ids": [3]})
        assert (status, reply["engine"]) == (200, "d0")
        async with client.get(f"{url}/metrics") as resp:
            assert 'dualpath_router_errors_total{kind="http_500"}' not in await resp.text()


@run_async
async def test_a_thousand_connections_at_once_are_all_answered_and_nothing_leaks():
    fds = len(os.listdir("/proc/self/fd"))
    gate = asyncio.Event()
    prefill, decode = pd_fakes(1, 2, gate=gate)
    tasks_before = len(asyncio.all_tasks())
    async with cluster(prefill, decode, queue_timeout_s=60.0) as (url, client, router):
        connector = aiohttp.TCPConnector(limit=0)  # one connection per request
        async with aiohttp.ClientSession(connector=connector) as many:
            calls = [asyncio.create_task(post(many, f"{url}/generate", {"input_ids": [i % 50 + 1] * 8}))
                     for i in range(1000)]
            await until(lambda: sum(e.held_reqs for e in decode) == 1000, "all 1000 in flight at once", 60)
            gate.set()
            results = await asyncio.gather(*calls)
        assert [status for status, _ in results] == [200] * 1000
        await until(lambda: all(e.inflight_reqs == 0 for e in router.registry.engines), "every leg was released")
        status, _ = await post(client, f"{url}/generate", {"input_ids": [7]})
        assert status == 200
    assert len(asyncio.all_tasks()) == tasks_before  # no task left behind
    await until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2, "every socket closed")
