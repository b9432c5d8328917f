"""Layer Block grids and batched descriptors, checked by applying them to real memory with numpy."""

from __future__ import annotations

import numpy as np
import pytest
from dualpath.kv import BlockBuffer, BlockLayout, KVGeometry
from dualpath.kv.layout import address
from dualpath.transfer import LayerBlockGrid, grid_for_buffer, grid_for_layer_major, merged_pair_descs
from hypothesis import given, settings
from hypothesis import strategies as st


def layout_of(layers: int, tokens: int, bytes_per_token: int) -> BlockLayout:
    return BlockLayout(KVGeometry("t", layers, bytes_per_token, "bfloat16", "mha", 1, 1), tokens)


def apply(descs_src: np.ndarray, src: np.ndarray, descs_dst: np.ndarray, dst: np.ndarray) -> None:
    """Do what NIXL does with two descriptor lists, on two numpy arrays."""
    for (s, length, _), (d, _, _) in zip(descs_src.astype(np.int64), descs_dst.astype(np.int64), strict=True):
        s, d = s - address(src), d - address(dst)
        dst[d : d + length] = src[s : s + length]


class Side:
    """One grid over real memory, either a store BlockBuffer or a layer-major pool."""

    def __init__(self, layout: BlockLayout, slots: int, layer_major: bool, seed: int) -> None:
        self.layout, self.layer_major = layout, layer_major
        if layer_major:
            self.memory = np.zeros(layout.full_block_bytes * slots, dtype=np.uint8)
            self.grid = grid_for_layer_major("g", self.memory, layout, slots)
        else:
            self.buffer = BlockBuffer(layout, slots)
            self.memory = self.buffer.region
            self.grid = grid_for_buffer("g", self.buffer)
        self.memory[:] = np.random.default_rng(seed).integers(0, 256, self.memory.size, dtype=np.uint8)

    def token(self, slot: int, layer: int, token: int) -> np.ndarray:
        if self.layer_major:
            layers, tokens, width = self.layout.shape
            pool = self.memory.reshape(layers, -1, tokens, width)
            return pool[layer, slot, token]
        return self.layout.layer_block(self.buffer.block(slot), layer)[0, token]


@st.composite
def transfers(draw: st.DrawFn) -> tuple:
    layout = layout_of(draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 40)))
    blocks = draw(st.integers(1, 4))
    capacity = draw(st.integers(blocks, 6))
    src_slots = draw(st.permutations(range(capacity)))[:blocks]
    dst_slots = draw(st.permutations(range(capacity)))[:blocks]
    start = draw(st.integers(0, blocks * layout.block_tokens - 1))
    end = draw(st.integers(start + 1, blocks * layout.block_tokens))
    majors = draw(st.booleans()), draw(st.booleans())
    return layout, capacity, np.array(src_slots), np.array(dst_slots), start, end, *majors


@settings(max_examples=150, deadline=None)
@given(transfers())
def test_token_range_descriptors_move_exactly_the_range(case: tuple) -> None:
    layout, capacity, src_slots, dst_slots, start, end, src_major, dst_major = case
    src, dst = Side(layout, capacity, src_major, 1), Side(layout, capacity, dst_major, 2)
    before = dst.memory.copy()
    expected = Side(layout, capacity, dst_major, 2)
    for layer in range(layout.geometry.layers):
        for t in range(start, end):
            block, k = divmod(t, layout.block_tokens)
            expected.token(dst_slots[block], layer, k)[:] = src.token(src_slots[block], layer, k)
        s_starts, lengths = src.grid.token_segments(src_slots, layer, start, end)
        d_starts, _ = dst.grid.token_segments(dst_slots, layer, start, end)
        s_descs, d_descs = merged_pair_descs(s_starts, d_starts, lengths, 0, 0)
        assert s_descs[:, 1].sum() == (end - start) * layout.geometry.bytes_per_token_per_layer
        assert len(s_descs) <= len(s_starts)
        apply(s_descs, src.memory, d_descs, dst.memory)
    assert np.array_equal(dst.memory, expected.memory)
    assert np.count_nonzero(dst.memory != before) <= np.count_nonzero(expected.memory != before)


def test_contiguous_runs_are_merged_and_gaps_are_not() -> None:
    src = np.array([0, 10, 20, 50], dtype=np.int64) + 4096
    dst = np.array([0, 10, 30, 40], dtype=np.int64) + 8192
    s, d = merged_pair_descs(src, dst, np.full(4, 10, dtype=np.int64), 0, 1)
    assert s.tolist() == [[4096, 20, 0], [4116, 10, 0], [4146, 10, 0]]
    assert d.tolist() == [[8192, 20, 1], [8222, 10, 1], [8232, 10, 1]]


def test_layer_indices_address_the_prepared_rows() -> None:
    layout = layout_of(3, 4, 8)
    buffer = BlockBuffer(layout, 5)
    grid = grid_for_buffer("b", buffer)
    rows = grid.all_layer_blocks()
    assert rows.shape == (15, 3) and (rows[:, 1] == layout.layer_block_bytes).all()
    slots = np.array([4, 0, 2])
    for layer in range(3):
        picked = rows[grid.layer_indices(slots, layer)]
        starts, lengths = grid.token_segments(slots, layer, 0, 3 * layout.block_tokens)
        assert picked[:, 0].tolist() == starts.tolist() and picked[:, 1].tolist() == lengths.tolist()
    assert grid.extent <= buffer.region.nbytes


def test_bad_grids_and_slots_are_rejected() -> None:
    layout = layout_of(2, 4, 8)
    grid = grid_for_layer_major("p", np.zeros(layout.full_block_bytes * 3, np.uint8), layout, 3)
    with pytest.raises(ValueError, match="slot out of range"):
        grid.check_slots(np.array([0, 3]))
    with pytest.raises(ValueError, match="non-empty"):
        grid.check_slots(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="layer 2 out of range"):
        grid.layer_indices(np.array([0]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        grid_for_layer_major("p", np.zeros(10, np.uint8), layout, 3)
    with pytest.raises(ValueError, match="strides"):
        LayerBlockGrid("x", 4096, 2, 2, slot_stride=8, layer_stride=64, block_tokens=4, bytes_per_token=8)
    with pytest.raises(ValueError, match="mem"):
        LayerBlockGrid("x", 4096, 2, 2, 64, 32, 4, 8, mem="HBM")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no bytes"):
        merged_pair_descs(*(np.array([], dtype=np.int64),) * 3, 0, 0)


def test_cpu_tensor_pool_gives_a_dram_grid() -> None:
    torch = pytest.importorskip("torch")
    layout = layout_of(2, 4, 8)
    pool = torch.zeros(layout.full_block_bytes * 2, dtype=torch.uint8)
    grid = grid_for_layer_major("t", pool, layout, 2)
    assert (grid.base, grid.mem, grid.device) == (pool.data_ptr(), "DRAM", 0)
