"""The stock router's service routes on the DualPath router, with sglang-router 0.3.2's semantics (taken from
the real package), against fake SGLang servers on 127.0.0.1 (router_fakes.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp
from test_router import cluster, free_port, pd_fakes, post, run_async, until


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
