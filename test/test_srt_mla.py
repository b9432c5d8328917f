"""An MLA model (DeepSeek-V2 architecture) in real SGLang servers on CPU: PE path, DE path, split, and stock.

The tiny DeepSeek-V2 shipped with the package (``srt/tiny_deepseek_v2``: 2 layers, kv_lora_rank 64, rope 16)
gets random weights here (transformers' own initialisation, seed 0): SGLang's dummy weights give every token
the same logit, so no KV could change an output. Paths are compared by the top-k logprobs of every output
token; a page with a valid checksum but the wrong content must change them (the oracle's negative control).
"""

from __future__ import annotations

import os

import pytest
import test_srt as srt
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.srt import surface

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")
torch = pytest.importorskip("torch")

BOOTSTRAP = 31701


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    from dualpath.cluster.servers import TINY_MODEL, ServerOptions, ServerSpec, start_servers, stop_servers

    root = tmp_path_factory.mktemp("mla")
    model = srt.with_random_weights(TINY_MODEL.with_name("tiny_deepseek_v2"), root / "tiny_deepseek_v2")
    options = ServerOptions(root / "store", root / "logs", model=model, transfer_timeout_s=5.0,
                            extra_args=("--load-format", "safetensors"),
                            env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"})
    # One emulated compute NIC of 2.5 Mb/s: a DE's 4 pages (40 KiB each) land over about half a second, so the
    # prefill's forward takes them layer by layer.
    link = ("--dualpath-compute-gbps", "0.0025", "--dualpath-compute-nic", f"test-mla-{os.getpid()}")
    specs = [ServerSpec("prefill", 31700, "pe0", bootstrap_port=BOOTSTRAP, extra_args=link),
             ServerSpec("decode", 31750, "de0", extra_args=link), ServerSpec("null", 31780, dualpath=False)]
    started = start_servers(specs, options, timeout_s=400)
    yield {s.spec.role: s for s in started} | {"store": root / "store"}
    stop_servers(started)


def test_mla_pages_on_every_path_give_stock_logprobs(servers: dict) -> None:
    ids = srt._prompt(21)
    stock = srt._stock(servers, ids)
    assert len(stock) == 8 and len({token for top in stock for _, token in top}) > 5  # not one loop
    first, _ = srt._pd_generate(servers, ids, RouteHint(ReadSide.PE))
    assert srt.same_logprobs(first, stock)
    hit = 64 * len(srt._stored(servers, ids))
    assert servers["decode"].report().store_namespace.startswith("sglang-tiny_deepseek_v2-float32")
    pe, de = srt._channels(servers)
    for hint, de_tokens in ((RouteHint(ReadSide.DE, pe, de), hit), (RouteHint(ReadSide.PE), 0),
                            (RouteHint(ReadSide.SPLIT, pe, de, 128), 128)):
        srt._flush(servers)
        before = {n: srt._node_read_tokens(servers["store"], n) for n in ("pe0", "de0")}
        prefill_before = servers["prefill"].report()
        top, prefill_meta = srt._pd_generate(servers, ids, hint)
        assert prefill_meta["cached_tokens_details"]["storage"] == hit, hint.side
        assert srt.same_logprobs(top, stock), hint.side
        read = {n: srt._node_read_tokens(servers["store"], n) - before[n] for n in ("pe0", "de0")}
        assert read == {"pe0": hit - de_tokens, "de0": de_tokens}, hint.side
        assert srt._entered_layer_by_layer(servers["prefill"], prefill_before, de_tokens // 64), hint.side


def test_a_page_with_a_valid_checksum_but_wrong_content_changes_the_logprobs(servers: dict) -> None:
    # The servers' page: two latent planes of kv_lora_rank + rope = 80 floats per token.
    page = surface.PoolShape("layer_first", torch.float32, "mla", 2, 1, 80, 64)
    srt.wrong_page_changes_logprobs(servers, srt._prompt(22), page, "tiny_deepseek_v2")
