"""Tensor parallelism on CPU: a DualPath prefill/decode pair at TP=2 against stock SGLang at TP=1.

Each rank of the prefill reads its share of the heads (MHA; MLA ranks each hold the whole latent, stored once)
on the PE path, or gets it from the decode's rank of the same number on the DE path (rank r's KV channel
listens on the server's KV port + r); the logprobs of every output token must be those of one stock server.
"""

from __future__ import annotations

import os

import pytest
import test_srt as srt
from dualpath.scheduler import ReadSide, RouteHint

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")

BOOTSTRAP = 31811
TP = ("--tp", "2")


PROMPT = srt._prompt(31)


# model -> the namespace its rank 0 stores pages in: MHA ranks apart, MLA ranks one copy.
MODELS = {"tiny_llama": "sglang-tiny_llama-tp0of2-float32", "tiny_deepseek_v2": "sglang-tiny_deepseek_v2-float32"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from dualpath.cluster.servers import TINY_MODEL, ServerOptions, ServerSpec, start_servers, stop_servers

    root = tmp_path_factory.mktemp("tp")
    model = srt.with_random_weights(TINY_MODEL.with_name(request.param), root / request.param)
    options = ServerOptions(root / "store", root / "logs", model,
                            max_total_tokens=16384, transfer_timeout_s=5.0, extra_args=("--load-format", "safetensors"),
                            env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"})
    # One after the other: SGLang keeps 10 GB of host memory free beside a HiCache host pool, and five
    # scheduler processes at once leave less than that on a 24 GB machine.
    stock = start_servers([ServerSpec("null", 31800, dualpath=False)], options, timeout_s=300)
    try:
        expected = srt._stock({"null": stock[0]}, PROMPT)
    finally:
        stop_servers(stock)
    # One emulated compute NIC of 2.5 Mb/s for both servers' ranks: the DE's pages land over a second or so,
    # so each prefill rank's forward takes its shard layer by layer.
    link = ("--dualpath-compute-gbps", "0.0025", "--dualpath-compute-nic", f"test-tp-{os.getpid()}")
    specs = [ServerSpec("prefill", 31810, "pe0", bootstrap_port=BOOTSTRAP, extra_args=TP + link),
             ServerSpec("decode", 31850, "de0", extra_args=TP + link)]
    started = start_servers(specs, options, timeout_s=500)
    yield {s.spec.role: s for s in started} | {"store": root / "store", "stock": expected, "model": request.param}
    stop_servers(started)


def test_every_rank_reads_its_shard_on_the_pe_and_the_de_path(servers: dict) -> None:
    ids, stock = PROMPT, servers["stock"]
    first, _ = srt._pd_generate(servers, ids, RouteHint(ReadSide.PE))
    assert srt.same_logprobs(first, stock)
    hit = 64 * len(srt._stored(servers, ids))  # rank 0's pages (MHA: rank 1 stores its own beside them)
    assert servers["decode"].report().store_namespace.startswith(MODELS[servers["model"]])
    pe, de = srt._channels(servers)
    for hint, de_tokens in ((RouteHint(ReadSide.DE, pe, de), hit), (RouteHint(ReadSide.PE), 0)):
        srt._flush(servers)
        before = {n: srt._node_read_tokens(servers["store"], n) for n in ("pe0", "de0")}
        forwarded = servers["decode"].report().pages_forwarded
        prefill_before = servers["prefill"].report()
        top, prefill_meta = srt._pd_generate(servers, ids, hint)
        assert prefill_meta["cached_tokens_details"]["storage"] == hit, hint.side
        assert srt.same_logprobs(top, stock), hint.side
        read = {n: srt._node_read_tokens(servers["store"], n) - before[n] for n in ("pe0", "de0")}
        assert read == {"pe0": 2 * (hit - de_tokens), "de0": 2 * de_tokens}, hint.side  # every rank reads
        if hint.side is ReadSide.DE:  # each DE rank forwarded its shard (counters published a few times a second)
            assert srt._report_reaches(servers["decode"], "pages_forwarded", forwarded + 2 * hit // 64), \
                "the decode's ranks did not count what they forwarded"
            assert srt._entered_layer_by_layer(servers["prefill"], prefill_before, 2 * hit // 64)
