from __future__ import annotations

import numpy as np
import pytest
from dualpath.scheduler import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
from hypothesis import given, settings
from hypothesis import strategies as st

queue_st = st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 20_000)), min_size=1, max_size=30).map(
    lambda items: [Chunk(i, c, n) for i, (c, n) in enumerate(items)])
models_st = st.builds(AttentionCostModel, st.floats(0, 0.05), st.floats(1e-6, 1e-4), st.floats(0, 1e-9),
                      st.sampled_from([None, 1024, 2048]))


@settings(max_examples=200, deadline=None)
@given(queue_st, models_st, st.floats(0.01, 1.0))
def test_batch_is_a_fifo_prefix_within_quota_and_maximal(queue, model, quota):
    batcher = ComputeQuotaBatcher(model.predict, BatcherConfig(quota_s=quota))
    batch = batcher.form_batch(queue)
    assert batch, "an engine with work always makes progress"
    assert [c.key for c in batch] == [c.key for c in queue[: len(batch)]]
    assert all(c == q for c, q in zip(batch[:-1], queue, strict=False))  # all but the last are whole
    last, source = batch[-1], queue[len(batch) - 1]
    assert last.cached == source.cached and 1 <= last.new <= source.new
    pairs = [(c.cached, c.new) for c in batch]
    if model.predict(pairs) > quota:  # only the forced single token of an oversized head may exceed it
        assert len(batch) == 1 and last.new == 1
        return
    if last.new < source.new:  # chunked: one more token would break the quota
        assert model.predict([*pairs[:-1], (last.cached, last.new + 1)]) > quota
    elif len(batch) < len(queue):  # whole: not even one token of the next request fits
        nxt = queue[len(batch)]
        assert model.predict([*pairs, (nxt.cached, 1)]) > quota


@settings(max_examples=100, deadline=None)
@given(queue_st, st.integers(1, 200_000))
def test_resident_token_cap_is_respected(queue, cap):
    model = AttentionCostModel(0.0, 1e-9, 0.0)
    batcher = ComputeQuotaBatcher(model.predict, BatcherConfig(quota_s=10.0, max_tokens=cap))
    batch = batcher.form_batch(queue)
    resident = sum(c.cached + c.new for c in batch)
    assert resident <= cap or (len(batch) == 1 and batch[0].new == 1)


def test_quota_bounds_a_chunked_long_prompt():
    model = AttentionCostModel(0.0, 1e-4, 0.0)  # 0.1 ms per token: 300 ms = 3,000 tokens
    batch = ComputeQuotaBatcher(model.predict).form_batch([Chunk(0, 0, 2_000), Chunk(1, 5_000, 4_000)])
    assert batch == [Chunk(0, 0, 2_000), Chunk(1, 5_000, 1_000)]


def test_sparse_attention_caps_the_attended_context():
    dense = AttentionCostModel.features([(100_000, 10)], None)
    sparse = AttentionCostModel.features([(100_000, 10)], 2048)
    assert sparse == (10, 10 * 2048) and dense[1] > sparse[1]
    # A prompt crossing top-k: 1,000 tokens grow up to 2,048 keys, then 1,000 see exactly 2,048.
    assert AttentionCostModel.features([(1048, 2000)], 2048)[1] == 1000 * (1048 + 500.5) + 1000 * 2048


def test_fit_recovers_profiled_coefficients():
    truth = AttentionCostModel(0.003, 3e-5, 4e-10, 2048)
    batches = [[(c, n)] for c in (0, 4_000, 30_000, 100_000) for n in (64, 512, 4_096)]
    batches += [[(8_000, 300), (60_000, 700)], [(0, 8_000), (1_000, 100)]]
    fitted = AttentionCostModel.fit(batches, [truth.predict(b) for b in batches], topk=2048)
    for b in batches:
        assert fitted.predict(b) == pytest.approx(truth.predict(b), rel=1e-6)


def test_fit_on_few_batch_shapes_keeps_every_coefficient_non_negative():
    # Two shapes of fresh prompts (a server's first batches) with timing noise: the per-token cost must not be
    # inflated to make up for a negative per-pair one (as an unconstrained fit clipped at zero did).
    rng = np.random.default_rng(0)
    truth = AttentionCostModel(0.02, 4e-4, 1e-8)
    batches = [[(0, n)] for n in (64, 64, 2048, 2048, 2048, 2048, 2048, 2048)]
    seconds = [truth.predict(b) * (1 + 0.05 * rng.standard_normal()) for b in batches]
    fitted = AttentionCostModel.fit(batches, seconds)
    assert min(fitted.base_s, fitted.per_token_s, fitted.per_pair_s) >= 0
    for b in batches:
        assert fitted.predict(b) == pytest.approx(truth.predict(b), rel=0.1)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="quota_s"):
        BatcherConfig(quota_s=0)
    with pytest.raises(ValueError, match="max_tokens"):
        BatcherConfig(max_tokens=0)
    with pytest.raises(ValueError, match=">= 3 profiled"):
        AttentionCostModel.fit([[(0, 1)]], [0.1])
    with pytest.raises(ValueError, match="queue entry 5"):
        ComputeQuotaBatcher(AttentionCostModel().predict).form_batch([Chunk(5, 0, 0)])
    assert ComputeQuotaBatcher(AttentionCostModel().predict).form_batch([]) == []
