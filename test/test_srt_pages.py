"""SGLang's real KV pool classes, MHA and MLA, through DualPath's storage backend in one process.

A decode backend writes the pages of a host pool to the store; a prefill backend reads them back into its own
host pool on the PE path (its NIC) and on the DE path (the decode reads them and forwards them over its KV
channel, plane by plane in layer order). Every page must arrive byte for byte; SGLang's host <-> device copies
on CPU (the stand-ins of ``srt/cpu.py``) must move every layer of both pool kinds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dualpath.kv import block_keys
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.srt import surface
from dualpath.srt.config import ENV, SrtConfig, free_ports

torch = pytest.importorskip("torch")
pytest.importorskip("sglang", reason="the SGLang pool tests need `pip install sglang==0.5.17`")

PAGE, LAYERS, PAGES = 16, 3, 6


def _pools(attention: str) -> tuple[object, object]:
    """A device pool and its layer_first host pool, as SGLang builds them (float32, CPU, not pinned)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    if attention == "mla":  # kv_lora_rank 32 + qk_rope_head_dim 16: one 48-wide latent per token and layer
        device = MLATokenToKVPool(256, PAGE, torch.float32, 32, 16, LAYERS, "cpu", False)
        return device, MLATokenToKVPoolHost(device, 2.0, 0, PAGE, "layer_first", pin_memory=False, device="cpu")
    device = MHATokenToKVPool(256, PAGE, torch.float32, 2, 8, LAYERS, "cpu", False)
    return device, MHATokenToKVPoolHost(device, 2.0, 0, PAGE, "layer_first", pin_memory=False, device="cpu")


def _backend(monkeypatch: pytest.MonkeyPatch, role: str, node: str, root: Path, host_pool: object) -> object:
    from dualpath.srt.storage import DualPathStorage
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    config = SrtConfig(role, node, str(root), "127.0.0.1", free_ports("127.0.0.1"), timeout_s=5.0, staging_blocks=16,
                       page_size=PAGE)
    monkeypatch.setenv(ENV, config.to_env())
    backend = DualPathStorage(HiCacheStorageConfig(0, 1, 0, 1, 0, 1, True, False, False, "tiny"))
    backend.register_mem_pool_host(host_pool)
    return backend


def _page(pool: object, index: int) -> torch.Tensor:
    return surface.host_page(pool, index).clone()


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_pages_round_trip_through_the_store_and_the_de_path(attention: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ids = list(range(1, PAGES * PAGE + 1))
    keys = block_keys(ids, PAGE)
    indices = torch.arange(PAGE, PAGE * (PAGES + 1))  # host slots of the pages, page-aligned (slot 0 left free)
    _, de_pool = _pools(attention)
    _, pe_pool = _pools(attention)
    generator = torch.Generator().manual_seed(3)
    for page in range(PAGES):
        surface.set_host_page(de_pool, PAGE * (page + 1), torch.randn(surface.host_page(de_pool, 0).numel(),
                                                                       generator=generator))
    expected = [_page(de_pool, PAGE * (page + 1)) for page in range(PAGES)]
    shape = surface.pool_shape(de_pool)
    assert (shape.attention, shape.planes) == (attention, LAYERS if attention == "mla" else 2 * LAYERS)

    decode = _backend(monkeypatch, "decode", "de0", tmp_path, de_pool)
    prefill = _backend(monkeypatch, "prefill", "pe0", tmp_path, pe_pool)
    try:
        assert decode.batch_set_v1(keys, indices) == [True] * PAGES  # the decode writes back
        assert decode.store.config.namespace == prefill.store.config.namespace
        assert decode.store.layout.geometry.layers == shape.planes

        for rid, hint in (("pe", RouteHint(ReadSide.PE)),
                          ("de", RouteHint(ReadSide.DE, prefill.config.kv_channel, decode.config.kv_channel))):
            prefill.slots.forget()
            decode.slots.forget()
            for page in range(PAGES):
                surface.set_host_page(pe_pool, PAGE * (page + 1), torch.zeros_like(expected[page]).view(-1))
            before = prefill.store.stats().hits, decode.store.stats().hits
            prefill.routes.arrive(rid, None, hint.encode(), ids)
            ok = prefill.routes.serving(rid, lambda: prefill.batch_get_v1(keys, indices))
            assert ok == [True] * PAGES, rid
            for page in range(PAGES):
                assert torch.equal(_page(pe_pool, PAGE * (page + 1)), expected[page]), (rid, page)
            read = prefill.store.stats().hits - before[0], decode.store.stats().hits - before[1]
            assert read == ((PAGES, 0) if rid == "pe" else (0, PAGES)), rid

        # Negative control: a page the store no longer holds ends the hit there; the oracle above sees it.
        prefill.slots.forget()
        decode.slots.forget()
        surface.set_host_page(pe_pool, PAGE * PAGES, torch.zeros_like(expected[-1]).view(-1))
        entry = next(p for p in prefill.store.directory.rglob("*") if p.is_file() and keys[-1] in p.name)
        entry.unlink()
        prefill.routes.arrive("gone", None, None, ids)
        ok = prefill.routes.serving("gone", lambda: prefill.batch_get_v1(keys, indices))
        assert ok == [True] * (PAGES - 1) + [False]
        assert not torch.equal(_page(pe_pool, PAGE * PAGES), expected[-1])
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_cpu_host_copies_move_every_layer_of_both_pool_kinds(attention: str) -> None:
    from dualpath.srt import cpu

    device, host = _pools(attention)
    generator = torch.Generator().manual_seed(5)
    for layer in range(LAYERS):
        for buffer in surface.layer_buffers(device, layer):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    device_slots, host_slots = torch.arange(32, 48), torch.arange(64, 80)
    cpu.backup_from_device_all_layer(None, host, device, host_slots, device_slots, "direct")
    for layer in range(LAYERS):
        for dev, hst in zip(surface.layer_buffers(device, layer), surface.layer_buffers(host, layer), strict=True):
            assert torch.equal(hst[host_slots], dev[device_slots])
    back = torch.arange(96, 112)
    for layer in range(LAYERS):
        cpu.load_to_device_per_layer(None, host, device, host_slots, back, layer, "direct")
        for dev in surface.layer_buffers(device, layer):
            assert torch.equal(dev[back], dev[device_slots])
