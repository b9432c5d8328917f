from __future__ import annotations

import hashlib
from array import array

import numpy as np
import pytest
from dualpath.kv import PRESETS, BlockBuffer, BlockLayout, KVGeometry, block_keys, get_geometry, namespace_seed
from dualpath.kv.layout import address
from hypothesis import given
from hypothesis import strategies as st

tokens_strategy = st.lists(st.integers(0, 2**32 - 1), max_size=200)


def test_presets_match_published_kv_sizes():
    assert get_geometry("deepseek-v3").bytes_per_token == 70_272
    assert get_geometry("deepseek-v3.2").bytes_per_token == 656 * 61
    assert get_geometry("qwen2.5-32b").bytes_per_token == 256 * 1024
    assert get_geometry("llama-3-8b").bytes_per_token == 128 * 1024
    # The CPU test model: 2 layers x (K+V) x 2 KV heads x 64 dims x bf16.
    assert get_geometry("tiny").bytes_per_token == 2 * 2 * 2 * 64 * 2


def test_unknown_geometry_names_the_presets():
    with pytest.raises(ValueError, match="deepseek-v3"):
        get_geometry("gpt-5")
    with pytest.raises(ValueError, match="layers"):
        KVGeometry("bad", 0, 128, "bfloat16", "mha", 1, 32)
    assert set(PRESETS) >= {"deepseek-v3", "deepseek-v3.2", "qwen2.5-32b", "llama-3-8b", "tiny"}


def sglang_page_keys(tokens: list[int], page: int, prior_hex: str | None = None) -> list[str]:
    """SGLang's page-key rule written out with array('I') as its native hash binding does."""
    prior = bytes.fromhex(prior_hex) if prior_hex else b""
    keys = []
    for start in range(0, len(tokens) - page + 1, page):
        prior = hashlib.sha256(prior + array("I", tokens[start : start + page]).tobytes()).digest()
        keys.append(prior.hex())
    return keys


@given(tokens_strategy, st.sampled_from([1, 16, 64]))
def test_block_keys_follow_sglang_page_keys(tokens, page):
    assert block_keys(tokens, page) == sglang_page_keys(tokens, page)


@given(tokens_strategy, st.integers(0, 6))
def test_continuing_a_chain_equals_hashing_the_whole_prefix(tokens, split_blocks):
    whole = block_keys(tokens, 16)
    cut = min(split_blocks, len(whole)) * 16
    head = block_keys(tokens[:cut], 16)
    tail = block_keys(tokens[cut:], 16, prior_key=head[-1] if head else None)
    assert head + tail == whole


def test_keys_name_whole_prefixes_and_namespaces_separate_them():
    tokens = list(range(128))
    changed = [*tokens[:10], 999, *tokens[11:]]
    assert block_keys(tokens, 64)[1] != block_keys(changed, 64)[1]  # a change in block 0 renames block 1
    assert block_keys(tokens, 64) == block_keys([*tokens, 1, 2, 3], 64)  # partial blocks get no key
    spaced = block_keys(tokens, 64, namespace="tenant-a")
    assert not set(spaced) & set(block_keys(tokens, 64))
    assert spaced == block_keys(tokens, 64, prior_key=namespace_seed("tenant-a"))


def test_sglang_native_hash_agrees_when_installed():
    utils = pytest.importorskip("sglang.srt.mem_cache.utils", reason="sglang is not installed")
    tokens = list(np.random.default_rng(0).integers(0, 150_000, 300))
    assert block_keys(tokens, 64) == utils.get_hash_str(tokens, None, page_size=64)[:4]


@pytest.mark.parametrize(
    ("tokens", "prior", "message"),
    [([-1], None, "uint32"), ([2**32], None, "uint32"), ([[1]], None, "one-dimensional"), ([1.5], None, "integers"),
     ([1], "abc", "64-character")],
)
def test_bad_key_input_is_rejected(tokens, prior, message):
    with pytest.raises(ValueError, match=message):
        block_keys(tokens, 1, prior_key=prior)


def test_layer_block_is_a_view_at_its_layer_offset():
    layout = BlockLayout(get_geometry("llama-3-8b"), 16)
    buffer = BlockBuffer(layout, 3)
    full = buffer.block(1)
    layer = layout.layer_block(full, 5)
    assert layer.shape == (1, 16, 4096)
    assert np.shares_memory(layer, full) and np.shares_memory(layer, buffer.region)
    layer[:] = 7
    start = buffer.stride + 5 * layout.layer_block_bytes
    touched = np.flatnonzero(buffer.region)
    assert touched[0] == start and touched[-1] == start + layout.layer_block_bytes - 1
    with pytest.raises(IndexError):
        layout.layer_block(full, 32)


def test_block_buffer_slots_are_page_aligned_and_disjoint():
    layout = BlockLayout(get_geometry("deepseek-v3"), 16)  # 1,124,352 bytes: not a whole number of pages
    buffer = BlockBuffer(layout, 4)
    blocks = buffer.blocks(range(4))
    assert all(address(b) % 4096 == 0 for b in blocks)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    with pytest.raises(ValueError, match="Full Block"):
        layout.full_block(np.zeros(layout.full_block_bytes - 1, np.uint8))
