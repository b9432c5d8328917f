"""An MLA model (DeepSeek-V2 architecture) in real SGLang servers on CPU: PE path, DE path, split, and stock.

The tiny DeepSeek-V2 shipped with the package (``srt/tiny_deepseek_v2``: 2 layers, kv_lora_rank 64, rope 16)
gets random weights here (transformers' own initialisation, seed 0): SGLang's dummy weights give every token
the same logit, so no KV could change an output. Paths are compared by the top-k logprobs of every output
token; a page with a valid checksum but the wrong content must change them (the oracle's negative control).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dualpath.kv import BlockBuffer
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.srt import surface
from dualpath.store import BlockStatus, BlockStore, StoreConfig, drop_all_blocks
from test_srt import _channels, _flush, _node_read_tokens, _pd_post, _post, _prompt, _stored

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")
torch = pytest.importorskip("torch")
from dualpath.srt.storage import page_geometry  # noqa: E402 - imports SGLang

BOOTSTRAP = 31701
TOP_K = 5
LOGPROBS = {"return_logprob": True, "top_logprobs_num": TOP_K}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dualpath.cluster.servers import TINY_MODEL
    from transformers import AutoConfig, AutoModelForCausalLM

    target = tmp_path_factory.mktemp("model") / "tiny_deepseek_v2"
    shutil.copytree(TINY_MODEL.with_name("tiny_deepseek_v2"), target)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.float32).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def servers(model: Path, tmp_path_factory: pytest.TempPathFactory):
    from dualpath.cluster.servers import ServerOptions, ServerSpec, start_servers, stop_servers

    root = tmp_path_factory.mktemp("mla")
    options = ServerOptions(root / "store", root / "logs", model=model, transfer_timeout_s=5.0,
                            extra_args=("--load-format", "safetensors"),
                            env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"})
    specs = [ServerSpec("prefill", 31700, "pe0", bootstrap_port=BOOTSTRAP), ServerSpec("decode", 31750, "de0"),
             ServerSpec("null", 31780, dualpath=False)]
    started = start_servers(specs, options, timeout_s=400)
    yield {s.spec.role: s for s in started} | {"store": root / "store"}
    stop_servers(started)


def _top(response: dict) -> list[list[tuple[float, int]]]:
    """The top-k (logprob, token) of every output token."""
    return [[(logprob, token) for logprob, token, _ in top] for top in response["meta_info"]["output_top_logprobs"]]


def _close(a: list[list[tuple[float, int]]], b: list[list[tuple[float, int]]], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(i == j and abs(p - q) <= tol for (p, i), (q, j) in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


def _stock(servers: dict, ids: list[int]) -> list[list[tuple[float, int]]]:
    out: dict = {}
    _post(servers["null"].url, {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                       "ignore_eos": True}, **LOGPROBS}, out, "r")
    return _top(out["r"])


def _pd(servers: dict, ids: list[int], hint: RouteHint) -> tuple[list[list[tuple[float, int]]], dict]:
    out = _pd_post(servers, ids, hint, LOGPROBS, BOOTSTRAP)
    return _top(out["decode"]), out["prefill"]["meta_info"]


def test_mla_pages_on_every_path_give_stock_logprobs(servers: dict) -> None:
    ids = _prompt(21)
    stock = _stock(servers, ids)
    assert len(stock) == 8 and len({token for top in stock for _, token in top}) > TOP_K  # not one loop
    first, _ = _pd(servers, ids, RouteHint(ReadSide.PE))
    assert _close(first, stock)
    hit = 64 * len(_stored(servers, ids))
    assert servers["decode"].report().store_namespace.startswith("sglang-tiny_deepseek_v2-float32")
    pe, de = _channels(servers)
    for hint, de_tokens in ((RouteHint(ReadSide.DE, pe, de), hit), (RouteHint(ReadSide.PE), 0),
                            (RouteHint(ReadSide.SPLIT, pe, de, 128), 128)):
        _flush(servers)
        before = {n: _node_read_tokens(servers["store"], n) for n in ("pe0", "de0")}
        top, prefill_meta = _pd(servers, ids, hint)
        assert prefill_meta["cached_tokens_details"]["storage"] == hit, hint.side
        assert _close(top, stock), hint.side
        read = {n: _node_read_tokens(servers["store"], n) - before[n] for n in ("pe0", "de0")}
        assert read == {"pe0": hit - de_tokens, "de0": de_tokens}, hint.side


def test_a_page_with_a_valid_checksum_but_wrong_content_changes_the_logprobs(servers: dict) -> None:
    ids = _prompt(22)
    stock = _stock(servers, ids)
    _pd(servers, ids, RouteHint(ReadSide.PE))
    keys = _stored(servers, ids)
    namespace = servers["decode"].report().store_namespace
    # The servers' own page geometry: two latent planes of kv_lora_rank + rope = 80 floats per token.
    geometry = page_geometry(surface.PoolShape("layer_first", torch.float32, "mla", 2, 1, 80, 64), "tiny_deepseek_v2")
    store = BlockStore(StoreConfig(servers["store"], model=geometry, block_tokens=64, node="test"))
    try:
        assert store.config.namespace == namespace
        buffer = BlockBuffer(store.layout, len(keys))
        assert store.read(keys, buffer.blocks(range(len(keys)))) == [BlockStatus.OK] * len(keys)
        page = buffer.block(1).view("float32")
        page[:] = -page  # page 1's latents negated: as valid a page as any
        drop_all_blocks(servers["store"])
        assert store.write(keys, buffer.blocks(range(len(keys)))) == [BlockStatus.OK] * len(keys)
    finally:
        store.close()
    _flush(servers)
    top, prefill_meta = _pd(servers, ids, RouteHint(ReadSide.PE))
    assert prefill_meta["cached_tokens_details"]["storage"] == 64 * len(keys)  # read as a valid hit
    assert not _close(top, stock)
