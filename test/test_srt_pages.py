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


def _pools(attention: str, device: str = "cpu") -> tuple[object, object]:
    """A device pool and its layer_first host pool, as SGLang builds them (float32; pinned for a CUDA pool)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    if attention == "mla":  # kv_lora_rank 32 + qk_rope_head_dim 16: one 48-wide latent per token and layer
        pool = MLATokenToKVPool(256, PAGE, torch.float32, 32, 16, LAYERS, device, False)
        return pool, MLATokenToKVPoolHost(pool, 2.0, 0, PAGE, "layer_first", pin_memory=device == "cuda", device="cpu")
    pool = MHATokenToKVPool(256, PAGE, torch.float32, 2, 8, LAYERS, device, False)
    return pool, MHATokenToKVPoolHost(pool, 2.0, 0, PAGE, "layer_first", pin_memory=device == "cuda", device="cpu")


def _backend(monkeypatch: pytest.MonkeyPatch, role: str, node: str, root: Path, host_pool: object) -> object:
    from dualpath.srt.storage import DualPathStorage
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    config = SrtConfig(role, node, str(root), "127.0.0.1", free_ports("127.0.0.1"), timeout_s=5.0, staging_blocks=16,
                       page_size=PAGE)
    monkeypatch.setenv(ENV, config.to_env())
    backend = DualPathStorage(HiCacheStorageConfig(0, 1, 0, 1, 0, 1, True, False, False, "tiny"))
    backend.register_mem_pool_host(host_pool)
    return backend


def _free(pool: object, indices: torch.Tensor) -> None:
    """SGLang frees the host pages at ``indices`` (placed by the test without allocating them: the pool's own
    bookkeeping is left out) through the decode's hook."""
    from dualpath.srt.held import on_host_free

    on_host_free(lambda _pool, freed: len(freed), pool, indices)


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

        de_hint = RouteHint(ReadSide.DE, prefill.config.kv_channel, decode.config.kv_channel)
        # The decode forwards the pages its host pool holds from memory; once SGLang frees them, from the store.
        for rid, hint in (("pe", RouteHint(ReadSide.PE)), ("de-held", de_hint), ("de", de_hint)):
            if rid == "de":
                _free(de_pool, indices)
                assert len(decode.held) == 0
            prefill.slots.forget()
            decode.slots.forget()
            from_memory = decode.state.snapshot().pages_forwarded_from_memory
            for page in range(PAGES):
                surface.set_host_page(pe_pool, PAGE * (page + 1), torch.zeros_like(expected[page]).view(-1))
            before = prefill.store.stats().hits, decode.store.stats().hits
            prefill.routes.arrive(rid, None, hint.encode(), ids)
            ok = prefill.routes.serving(rid, lambda: prefill.batch_get_v1(keys, indices))
            assert ok == [True] * PAGES, rid
            prefill.gate.settle(indices)  # DE pages enter the host pool layer by layer
            for page in range(PAGES):
                assert torch.equal(_page(pe_pool, PAGE * (page + 1)), expected[page]), (rid, page)
            read = prefill.store.stats().hits - before[0], decode.store.stats().hits - before[1]
            assert read == {"pe": (PAGES, 0), "de-held": (0, 0), "de": (0, PAGES)}[rid]
            forwarded_from_memory = decode.state.snapshot().pages_forwarded_from_memory - from_memory
            assert forwarded_from_memory == (PAGES if rid == "de-held" else 0), rid

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


def test_an_early_read_reads_the_pages_hicache_prefetches_on_the_routed_side(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ids = list(range(1, PAGES * PAGE + 1))
    keys, indices = block_keys(ids, PAGE), torch.arange(PAGE, PAGE * (PAGES + 1))
    _, de_pool = _pools("mha")
    _, pe_pool = _pools("mha")
    decode = _backend(monkeypatch, "decode", "de0", tmp_path, de_pool)
    prefill = _backend(monkeypatch, "prefill", "pe0", tmp_path, pe_pool)
    try:
        assert decode.batch_set_v1(keys, indices) == [True] * PAGES
        _free(de_pool, indices)  # the decode reads what it forwards
        de_hint = RouteHint(ReadSide.DE, prefill.config.kv_channel, decode.config.kv_channel)
        for rid, hint, held in (("pe-cold", RouteHint(ReadSide.PE), 0), ("pe-warm", RouteHint(ReadSide.PE), 2),
                                ("de-cold", de_hint, 0), ("de-warm", de_hint, 5)):
            prefill.slots.forget()
            decode.slots.forget()
            before = prefill.store.stats().hits, decode.store.stats().hits
            prefill.routes.arrive(rid, None, hint.encode(), ids)
            # HiCache prefetches what its memory does not hold: the tokens past ``held`` pages, chained to the last
            prefill.prefetching(rid, ids[held * PAGE:], keys[held - 1] if held else None)
            prefill._early.wait(rid)
            read = prefill.store.stats().hits - before[0], decode.store.stats().hits - before[1]
            assert read == ((PAGES - held, 0) if hint.side is ReadSide.PE else (0, PAGES - held)), rid
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


def _torch_load(host_pool: object, device_pool: object, host_indices: torch.Tensor, device_indices: torch.Tensor,
                layer: int, io_backend: str) -> None:
    """SGLang's per-layer host -> device load, as the hook chain passes it, on either device."""
    for host, device in zip(surface.layer_buffers(host_pool, layer), surface.layer_buffers(device_pool, layer),
                            strict=True):
        device[device_indices.to(device.device)] = host[host_indices].to(device.device)


@pytest.mark.parametrize("device_type", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the slot -> GPU placement (Triton kernel, pinned slots) needs CUDA"))])
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_the_forward_of_layer_i_waits_for_layer_i_only(attention: str, device_type: str) -> None:
    """A DE page still landing: SGLang's per-layer load defers it, the device pool's wait for layer i places
    layer i from the slot straight into the device pool once its planes landed (and not before, and not
    through the host pool), the host pool gets every layer when the page has landed, a layer deferred past
    that is loaded from the host pool, the slot is released; a DE failing mid-way is recovered from the
    store, a lost page is not placed."""
    import threading

    from dualpath.kv import BlockLayout
    from dualpath.srt import layers
    from dualpath.srt.blocks import BlockSlots
    from dualpath.srt.hicache import page_geometry
    from dualpath.srt.link import layer_planes
    from dualpath.transfer.flows import Inbound

    device, host = _pools(attention, device_type)
    shape = surface.pool_shape(host)
    slots = BlockSlots(BlockLayout(page_geometry(shape, "tiny"), PAGE), 4, timeout_s=5.0)
    flat = lambda slot: torch.from_numpy(slots.block(slot).reshape(-1)).view(torch.float32)  # noqa: E731
    planes = layer_planes(slots.buffer.layout.geometry)
    gate = layers.LayerGate(host, slots, flat)
    surface.set_layer_counter(device, gate)
    generator = torch.Generator().manual_seed(7)

    def landing(recover: bool | None = None) -> tuple[Inbound, torch.Tensor, int]:
        [slot] = slots.take(1)
        page = torch.randn(flat(slot).shape, generator=generator)
        inbound = Inbound("r", "de", shape.planes, 30.0, lambda flow, reason: flow.fail(reason))
        recovered = lambda: recover is not None and bool(flat(slot).copy_(page) is not None) and recover  # noqa: E731
        gate.track(layers.Landing("r", inbound, [slot], planes, recovered))
        return inbound, page, slot

    def land(inbound: Inbound, page: torch.Tensor, slot: int, layer: int) -> None:
        for plane in planes[layer]:
            size = page.numel() // shape.planes
            flat(slot)[plane * size:(plane + 1) * size] = page[plane * size:(plane + 1) * size]
            inbound.landed(plane)

    def device_layer(layer: int, at: torch.Tensor) -> torch.Tensor:
        return torch.cat([buffer[at.to(buffer.device)].reshape(-1).cpu()
                          for buffer in surface.layer_buffers(device, layer)])

    def expected_layer(page: torch.Tensor, layer: int) -> torch.Tensor:
        size = page.numel() // shape.planes
        return torch.cat([page[p * size:(p + 1) * size] for p in planes[layer]])

    try:
        inbound, page, slot = landing()
        assert gate.hold(slot, PAGE) and not gate.hold((slot + 1) % 4, 2 * PAGE)  # not landing: copied whole
        host_at, device_at = torch.arange(PAGE, 2 * PAGE), torch.arange(64, 64 + PAGE, device=device_type)
        for layer in range(LAYERS):  # what start_loading does before the forward
            layers.on_load(_torch_load, host, device, host_at, device_at, layer, "direct")
        assert not device_layer(0, device_at).any()  # deferred, not loaded from an empty host page
        surface.host_page(host, PAGE).fill_(float("nan"))
        land(inbound, page, slot, 0)
        device.get_key_buffer(0)
        assert torch.equal(device_layer(0, device_at), expected_layer(page, 0))
        assert surface.host_page(host, PAGE).isnan().all()  # from the slot, not through the host pool

        waiting = threading.Thread(target=device.get_key_buffer, args=(1,))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # layer 1 has not landed
        assert not device_layer(1, device_at).any()
        land(inbound, page, slot, 1)
        waiting.join(10)
        assert not waiting.is_alive() and torch.equal(device_layer(1, device_at), expected_layer(page, 1))
        for layer in range(2, LAYERS):
            land(inbound, page, slot, layer)
        gate.settle(host_at)
        assert torch.equal(surface.host_page(host, PAGE).reshape(-1), page)
        for layer in range(2, LAYERS):  # deferred, then settled before the forward asked: from the host pool
            device.get_key_buffer(layer)
            assert torch.equal(device_layer(layer, device_at), expected_layer(page, layer))
        slots.take(4)  # every slot released again
        slots.release(range(4))

        # The DE fails after layer 0: layer 1 comes from the store (the recovery), then every layer.
        inbound, page, slot = landing(recover=True)
        assert gate.hold(slot, 2 * PAGE)
        host_at = torch.arange(2 * PAGE, 3 * PAGE)
        for layer in range(LAYERS):
            layers.on_load(_torch_load, host, device, host_at, device_at, layer, "direct")
        land(inbound, page, slot, 0)
        device.get_key_buffer(0)
        inbound.fail("DE died")
        device.get_key_buffer(1)
        assert torch.equal(device_layer(1, device_at), expected_layer(page, 1))
        gate.settle(host_at)
        assert torch.equal(surface.host_page(host, 2 * PAGE).reshape(-1), page)

        # Negative control: neither the DE nor the store has the page; nothing is placed.
        inbound, page, slot = landing(recover=False)
        assert gate.hold(slot, 3 * PAGE)
        inbound.fail("DE died")
        gate.settle(torch.arange(3 * PAGE, 4 * PAGE))
        assert not torch.equal(surface.host_page(host, 3 * PAGE).reshape(-1), page)
    finally:
        gate.close()
