"""KV copy kernels: the Triton kernel (run by Triton's CPU interpreter) against the torch reference and
against the Full Block definition, on fresh random data with poisoned outputs."""

from __future__ import annotations

import os
import subprocess
import types
from pathlib import Path
from unittest import mock

import pytest
from dualpath.kv import BlockBuffer, BlockLayout, KVGeometry, get_geometry
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the KV copy kernels need torch (CPU wheel is enough)")
triton = pytest.importorskip("triton", reason="the KV copy kernel tests run the Triton kernel under TRITON_INTERPRET=1")

# Triton picks interpreter or compiler when a kernel is defined, i.e. when dualpath_kernel is imported.
# The variable is set for that import only, so it does not leak into other tests or their subprocesses.
with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
    from dualpath_kernel import (
        CopyConfig,
        PagedKVPool,
        block_range,
        gather_blocks,
        resolve_backend,
        scatter_blocks,
        staged_view,
    )
    from dualpath_kernel.triton_copy import Launch, plan_copy

POISON = 0xFF  # NaN in bf16, fp16 and fp8 e4m3fn: an element nobody wrote cannot pass for data
PAGES = 8


def geometry(attention: str, dtype: str) -> KVGeometry:
    """Small shapes (the interpreter is slow): 2 layers; MHA 2 heads x 16 dims, MLA 32 + 4 rope dims."""
    element = 1 if dtype == "float8_e4m3fn" else 2
    if attention == "mha":
        return KVGeometry("test-mha", 2, 2 * 2 * 16 * element, dtype, "mha", 2, 16)
    return KVGeometry("test-mla", 2, 36 * element, dtype, "mla", 1, 36)


def poisoned_pool(geo: KVGeometry, page_size: int) -> PagedKVPool:
    pool = PagedKVPool.allocate(geo, PAGES, page_size)
    for parts in pool.buffers:
        for buffer in parts:
            buffer.view(torch.uint8).fill_(POISON)
    return pool


def random_pool(geo: KVGeometry, page_size: int) -> PagedKVPool:
    pool = PagedKVPool.allocate(geo, PAGES, page_size)
    for parts in pool.buffers:
        for buffer in parts:
            buffer.view(torch.uint8).copy_(torch.randint(0, 256, buffer.view(torch.uint8).shape, dtype=torch.uint8))
    return pool


def random_blocks(count: int, layers: int, page_size: int, token_bytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, layers, page_size, token_bytes), dtype=torch.uint8)


def pool_tokens(pool: PagedKVPool, layer: int) -> torch.Tensor:
    """``[slots, bytes]``: each slot's token bytes in ``layer``, components concatenated (K then V)."""
    rows = [buffer.view(torch.uint8).reshape(buffer.shape[0], -1) for buffer in pool.buffers[layer]]
    return torch.cat(rows, dim=1)


def pool_bytes(pool: PagedKVPool) -> list[torch.Tensor]:
    return [buffer.view(torch.uint8).clone() for parts in pool.buffers for buffer in parts]


def assert_blocks_are_pool_pages(blocks: torch.Tensor, pool: PagedKVPool, pages: list[int], first_layer: int) -> None:
    """The Full Block definition: token t of block i, layer l == slot pages[i] * page_size + t of layer l."""
    slots = torch.tensor(pages)[:, None] * pool.page_size + torch.arange(pool.page_size)
    for layer in range(blocks.shape[1]):
        assert torch.equal(blocks[:, layer], pool_tokens(pool, first_layer + layer)[slots])


def assert_untouched(pool: PagedKVPool, pages: list[int], written_layers: range) -> None:
    """Every page not written (other pages, other layers) still holds the poison."""
    for layer in range(pool.layers):
        tokens = pool_tokens(pool, layer).view(pool.pages, -1)
        kept = [p for p in range(pool.pages) if layer not in written_layers or p not in pages]
        assert bool((tokens[kept] == POISON).all()), f"layer {layer}: a page outside {pages} was written"


def test_cpu_runs_the_triton_kernel_under_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))  # type: ignore[arg-type]


grid = pytest.mark.parametrize(
    ("attention", "dtype", "page_size"),
    [(a, d, p) for a in ("mha", "mla") for d in ("bfloat16", "float16", "float8_e4m3fn") for p in (16, 32, 64)],
)


@grid
def test_scatter_full_block_range_matches_reference(attention, dtype, page_size):
    geo = geometry(attention, dtype)
    pool, expected = poisoned_pool(geo, page_size), poisoned_pool(geo, page_size)
    blocks = random_blocks(3, geo.layers, page_size, geo.bytes_per_token_per_layer)
    pages = torch.randperm(PAGES)[:3].tolist()
    scatter_blocks(blocks, pool, pages, backend="triton")
    scatter_blocks(blocks, expected, pages, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(pool_bytes(pool), pool_bytes(expected), strict=True))
    assert_blocks_are_pool_pages(blocks, pool, pages, 0)
    assert_untouched(pool, pages, range(geo.layers))


@grid
def test_gather_full_block_range_matches_reference(attention, dtype, page_size):
    geo = geometry(attention, dtype)
    pool = random_pool(geo, page_size)
    pages = [6, 1, 6, 3]  # a gather may read a page twice
    shape = (len(pages), geo.layers, page_size, geo.bytes_per_token_per_layer)
    blocks, expected = torch.full(shape, POISON, dtype=torch.uint8), torch.full(shape, POISON, dtype=torch.uint8)
    gather_blocks(pool, pages, blocks, backend="triton")
    gather_blocks(pool, pages, expected, backend="torch")
    assert torch.equal(blocks, expected)
    assert_blocks_are_pool_pages(blocks, pool, pages, 0)


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_layer_block_scatter_writes_only_its_layer(attention):
    geo = geometry(attention, "bfloat16")
    pool = poisoned_pool(geo, 16)
    full = random_blocks(2, geo.layers, 16, geo.bytes_per_token_per_layer)
    scatter_blocks(full[:, 1:2], pool, [4, 2], first_layer=1, backend="triton")
    assert_blocks_are_pool_pages(full[:, 1:2], pool, [4, 2], 1)
    assert_untouched(pool, [4, 2], range(1, 2))
    back = torch.full_like(full[:, 1:2], POISON)
    gather_blocks(pool, [4, 2], back, first_layer=1, backend="triton")
    assert torch.equal(back, full[:, 1:2])


def test_packed_odd_sized_rows_copy_byte_by_byte():
    # DeepSeek-V3.2-style packed rows of an odd byte count force single-byte words and masked tiles.
    geo = KVGeometry("packed", 2, 21, "float8_e4m3fn", "mla", 1, 20)
    pool = poisoned_pool(geo, 32)
    blocks = random_blocks(3, 2, 32, 21)
    scatter_blocks(blocks, pool, [7, 0, 3], backend="triton")
    assert_blocks_are_pool_pages(blocks, pool, [7, 0, 3], 0)
    assert_untouched(pool, [7, 0, 3], range(2))


@pytest.mark.parametrize(
    "geo",
    [geometry("mha", "float16"), KVGeometry("packed", 2, 21, "float8_e4m3fn", "mla", 1, 20)],
    ids=["mha", "packed"],
)
def test_tiles_smaller_than_a_row_loop_over_columns_and_tokens(geo):
    pool = poisoned_pool(geo, 16)
    blocks = random_blocks(2, geo.layers, 16, geo.bytes_per_token_per_layer)
    tiny = CopyConfig(tile_bytes=16, num_warps=1)
    scatter_blocks(blocks, pool, [6, 2], backend="triton", config=tiny)
    assert_blocks_are_pool_pages(blocks, pool, [6, 2], 0)
    assert_untouched(pool, [6, 2], range(geo.layers))
    back = torch.full_like(blocks, POISON)
    gather_blocks(pool, [6, 2], back, backend="triton", config=tiny)
    assert torch.equal(back, blocks)


def test_block_buffer_ranges_with_padded_stride_round_trip():
    geo = geometry("mla", "bfloat16")
    layout = BlockLayout(geo, 16)
    source, target = BlockBuffer(layout, 4), BlockBuffer(layout, 4)
    assert source.stride > layout.full_block_bytes  # blocks are page-aligned, so the range is strided
    source.region[:] = torch.randint(0, 256, (source.region.size,), dtype=torch.uint8).numpy()
    target.region[:] = POISON
    pool = poisoned_pool(geo, 16)
    scatter_blocks(block_range(source, 1, 3), pool, [5, 0, 2], backend="triton")
    gather_blocks(pool, [5, 0, 2], block_range(target, 0, 3), backend="triton")
    for i in range(3):
        assert (target.block(i) == source.block(i + 1)).all()
    assert (target.region[3 * target.stride :] == POISON).all()


def layer_first_pages(count: int, geo: KVGeometry, page_size: int) -> torch.Tensor:
    """Random SGLang ``layer_first`` host pages ``[count, planes, tokens, row_bytes]``: MHA all K planes, then all
    V planes; MLA one latent plane per layer."""
    components = 2 if geo.attention == "mha" else 1
    row = geo.bytes_per_token_per_layer // components
    return torch.randint(0, 256, (count, components * geo.layers, page_size, row), dtype=torch.uint8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_one_layer_of_layer_first_pages_goes_from_named_slots_to_pool_pages(attention, backend):
    # The prefill places a layer of the DE's pages straight from its staging slots (layers.py).
    geo = geometry(attention, "bfloat16")
    pool = poisoned_pool(geo, 16)
    planes = layer_first_pages(5, geo, 16)
    staged = planes.unflatten(1, (pool.components, geo.layers))
    scatter_blocks(staged[:, :, 1:2], pool, [6, 2], slots=[3, 0], first_layer=1, backend=backend)
    for slot, page in ((3, 6), (0, 2)):
        for component in range(pool.components):
            assert torch.equal(pool.page_rows(1, component)[page], planes[slot, component * geo.layers + 1])
    assert_untouched(pool, [6, 2], range(1, 2))
    back = torch.full_like(planes, POISON)
    gather_blocks(pool, [6, 2], back.unflatten(1, (pool.components, geo.layers))[:, :, 1:2], slots=[4, 1],
                  first_layer=1, backend=backend)
    written = torch.zeros(back.shape[:2], dtype=torch.bool)
    for target, source in ((4, 3), (1, 0)):
        for component in range(pool.components):
            plane = component * geo.layers + 1
            assert torch.equal(back[target, plane], planes[source, plane])
            written[target, plane] = True
    assert bool((back[~written] == POISON).all()), "a plane of another layer or slot was written"



@pytest.mark.parametrize(("op", "slots", "message"), [
    ("scatter", [0, 5], r"slot index 5 at position 1 is outside the staged blocks \[0, 5\)"),
    ("scatter", [-1, 0], "slot index -1 at position 0"),
    ("scatter", [0], "expected 1 page indices"),
    ("gather", [2, 2], r"slots \[2\] are targeted more than once"),
])
def test_bad_slots_are_rejected_before_launch(op, slots, message):
    geo = geometry("mla", "bfloat16")
    pool = poisoned_pool(geo, 16)
    planes = layer_first_pages(5, geo, 16)
    staged, before = planes.unflatten(1, (1, geo.layers)), pool_bytes(pool)
    kept = planes.clone()
    with pytest.raises(ValueError, match=message):
        if op == "scatter":
            scatter_blocks(staged, pool, [1, 2], slots=slots, backend="triton")
        else:
            gather_blocks(pool, [1, 2], staged, slots=slots, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, pool_bytes(pool), strict=True))
    assert torch.equal(planes, kept)


@settings(max_examples=20, deadline=None)
@given(
    attention=st.sampled_from(["mha", "mla"]),
    pages=st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=PAGES, unique=True),
    first_layer=st.integers(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_gather_after_scatter_returns_the_blocks_for_any_distinct_pages(attention, pages, first_layer, seed):
    torch.manual_seed(seed)
    geo = geometry(attention, "float8_e4m3fn")
    pool = poisoned_pool(geo, 16)
    blocks = random_blocks(len(pages), geo.layers - first_layer, 16, geo.bytes_per_token_per_layer)
    scatter_blocks(blocks, pool, pages, first_layer=first_layer, backend="triton")
    back = torch.full_like(blocks, POISON)
    gather_blocks(pool, pages, back, first_layer=first_layer, backend="triton")
    assert torch.equal(back, blocks)


@pytest.mark.parametrize("bad", [-1, PAGES, PAGES + 100])
@pytest.mark.parametrize("op", ["scatter", "gather"])
def test_out_of_range_pages_are_rejected_before_launch(bad, op):
    geo = geometry("mha", "bfloat16")
    pool = poisoned_pool(geo, 16)
    before = pool_bytes(pool)
    blocks = random_blocks(3, geo.layers, 16, geo.bytes_per_token_per_layer)
    staged = blocks.clone()
    with pytest.raises(ValueError, match=rf"page index {bad} at position 1 is outside"):
        if op == "scatter":
            scatter_blocks(blocks, pool, [2, bad, 3], backend="triton")
        else:
            gather_blocks(pool, torch.tensor([2, bad, 3], dtype=torch.int32), blocks, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, pool_bytes(pool), strict=True))
    assert torch.equal(blocks, staged)


def test_bad_arguments_name_the_bad_value():
    geo = geometry("mha", "bfloat16")
    pool = poisoned_pool(geo, 16)
    blocks = random_blocks(2, geo.layers, 16, geo.bytes_per_token_per_layer)
    cases = [
        (lambda: scatter_blocks(blocks, pool, [3, 3]), r"pages \[3\] are targeted more than once"),
        (lambda: scatter_blocks(blocks, pool, [1, 2, 3]), "expected 2 page indices"),
        (lambda: scatter_blocks(blocks, pool, [1.0, 2.0]), "must be integers"),
        (lambda: scatter_blocks(blocks[:, :, :8], pool, [1, 2]), "8 tokens but a pool page holds 16"),
        (lambda: scatter_blocks(blocks[..., :64], pool, [1, 2]), "64 bytes per token"),
        (lambda: scatter_blocks(blocks, pool, [1, 2], first_layer=1), r"layers \[1, 3\)"),
        (lambda: scatter_blocks(blocks.view(torch.int16), pool, [1, 2]), "uint8"),
        (lambda: scatter_blocks(random_blocks(2, 2, 16, 256)[..., ::2], pool, [1, 2]), "must be contiguous"),
        (lambda: scatter_blocks(blocks, pool, [1, 2], backend="cuda"), "backend must be"),
    ]
    before = pool_bytes(pool)
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, pool_bytes(pool), strict=True))


def test_pool_wraps_sglang_pools_and_rejects_inconsistent_buffers():
    k = [torch.zeros(32, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    v = [torch.zeros(32, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    mha = PagedKVPool.from_sglang(types.SimpleNamespace(k_buffer=k, v_buffer=v, page_size=16))
    assert (mha.layers, mha.components, mha.pages, mha.token_bytes) == (3, 2, 2, 128)
    assert mha.buffers[2][1] is v[2]
    mla = PagedKVPool.from_sglang(types.SimpleNamespace(kv_buffer=k, page_size=32))
    assert (mla.layers, mla.components, mla.pages, mla.token_bytes) == (3, 1, 1, 64)
    with pytest.raises(ValueError, match="neither kv_buffer"):
        PagedKVPool.from_sglang(types.SimpleNamespace(page_size=16))
    with pytest.raises(ValueError, match="not a whole number of pages"):
        PagedKVPool.mla(k, 24)
    with pytest.raises(ValueError, match="differs"):
        PagedKVPool.mha(k, [*v[:2], torch.zeros(32, 2, 8, dtype=torch.bfloat16)], 16)
    with pytest.raises(ValueError, match="contiguous"):
        PagedKVPool.mla([torch.zeros(16, 32, 2).transpose(1, 2)], 16)


TRITON_TYPES = {torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def hopper_memory_instructions(launch: Launch, tmp_path: Path) -> set[str]:
    """Compile a planned launch for sm_90 (no GPU needed) and list the global/local memory instructions."""
    from dualpath_kernel import triton_copy
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET the module's kernel is the interpreter's wrapper: compile its function anew.
    kernel = JITFunction(triton_copy._copy_pages_kernel.fn)
    signature: dict[str, str] = {}
    attrs = {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, launch.args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name], aligned = "*" + TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
        else:
            signature[name], aligned = ("i64" if abs(value) >= 2**31 else "i32"), value % 16 == 0
        if aligned:  # what Triton's launch-time specialisation tells the compiler
            attrs[(index,)] = [["tt.divisibility", 16]]
    signature.update(dict.fromkeys(launch.constants, "constexpr"))
    source = ASTSource(kernel, signature, launch.constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.num_warps})
    cubin = tmp_path / "copy.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {
        word for line in sass.splitlines() for word in line.split() if word.startswith(("LDG", "STG", "LDL", "STL"))
    }


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this triton wheel carries no CUDA tools (ptxas, cuobjdump)")
@pytest.mark.parametrize(("name", "to_pool", "staging"), [
    ("llama-3-8b", True, "full"), ("deepseek-v3", False, "full"), ("deepseek-v3.2", True, "full"),
    ("llama-3-8b", True, "layer_first"), ("deepseek-v3", True, "layer_first"),
])
def test_hopper_build_moves_16_byte_vectors(name, to_pool, staging, tmp_path):
    # The copy is bandwidth-bound: every data access must be a 16-byte vector (HOPPER.md), nothing spilled.
    layout = BlockLayout(get_geometry(name), 64)
    pool = PagedKVPool.allocate(layout.geometry, 2, 64)
    blocks, first_layer = torch.empty((2, *layout.shape), dtype=torch.uint8), 0
    if staging == "layer_first":  # one layer of the prefill's staging slots, SGLang's host pages (layers.py)
        blocks = torch.empty((2, pool.components * pool.layers, 64, pool.row_bytes), dtype=torch.uint8)
        blocks, first_layer = blocks.unflatten(1, (pool.components, pool.layers))[:, :, 3:4], 3
    slots, pages = torch.tensor([0, 1]), torch.tensor([1, 0])
    launch = plan_copy(staged_view(blocks, pool, first_layer), pool, slots, pages, first_layer, to_pool,
                       *CopyConfig())
    instructions = hopper_memory_instructions(launch, tmp_path)
    # Evict-first loads are the copied data; the plain 8-byte loads fetch indices and a buffer address.
    assert {i for i in instructions if i.startswith(("LDG.E.EF", "STG"))} == {"LDG.E.EF.128", "STG.E.128"}
    assert not {i for i in instructions if i.startswith(("LDL", "STL"))}
