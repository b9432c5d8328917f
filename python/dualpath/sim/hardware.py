"""Cluster and model constants for the simulator, with every assumption the paper leaves open written down.

Bandwidths are bytes/s, times seconds, sizes tokens unless a name says otherwise. The compute efficiency and
the storage efficiency are the two calibrated numbers (see docs/simulator.md): everything else is a
datasheet or architecture figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dualpath.kv import KVGeometry, get_geometry
from dualpath.scheduler.batcher import attended_pairs

# DS 27B (paper A.2) has no public checkpoint: 30 layers of V3.2-style MLA with the same FP8 cache format
# (512 fp8 latent + 4 fp32 scales + 64 bf16 rope = 656 B per token per layer), so 30 x 656 B per token.
DS27B_GEOMETRY = KVGeometry("ds-27b", 30, 656, "float8_e4m3fn", "mla", 1, 576)


@dataclass(frozen=True)
class HardwareSpec:
    """One node: `gpus` Hopper GPUs, one CNIC per GPU, one storage NIC per node (paper 7.2).

    storage_efficiency: the fraction of the 400 Gbps SNIC that reads of 64-token Full Blocks from 3FS reach;
    calibrated so that Basic's JCT matches the paper's Fig. 7 (see docs/simulator.md).
    kv_cnic_share: the CNIC share left to KV traffic next to model traffic (low-priority lane).
    store_aggregate_bps: the whole store's read ceiling; None = never the limit (the paper's 3FS saturates
    every SNIC).
    """

    gpus_per_node: int = 8
    snic_bps: float = 400e9 / 8
    cnic_bps: float = 400e9 / 8
    storage_efficiency: float = 0.47
    kv_cnic_share: float = 0.8
    peak_flops: float = 989e12
    store_aggregate_bps: float | None = None

    def node_read_bps(self, nodes: int) -> float:
        per_node = self.snic_bps * self.storage_efficiency
        if self.store_aggregate_bps is not None:
            per_node = min(per_node, self.store_aggregate_bps / nodes)
        return per_node

    @property
    def kv_cnic_bps(self) -> float:
        return self.cnic_bps * self.kv_cnic_share


@dataclass(frozen=True)
class ModelSpec:
    """Per-GPU prefill/decode cost of one model under EP+DP attention.

    Prefill FLOPs per new token: 2 x active parameters, plus per attended (query, key) pair and layer the
    main attention (capped at `topk` keys by sparse attention) and the indexer (which scores every key).
    Decode step: base + per request + per context token (the indexer reads the whole cache each step).
    """

    name: str
    geometry: KVGeometry
    active_params: float
    attn_flops_per_pair: float
    indexer_flops_per_pair: float
    topk: int
    mfu: float
    forward_overhead_s: float
    decode_base_s: float
    decode_per_request_s: float
    decode_per_context_token_s: float
    de_hbm_tokens: int
    basic_pe_hbm_tokens: int

    @property
    def bytes_per_token(self) -> int:
        return self.geometry.bytes_per_token

    def prefill_seconds(self, pairs: Sequence[tuple[int, int]], peak_flops: float,
                        attention_only: bool = False) -> float:
        """Predicted forward time of a prefill batch of (cached, new) pairs on one GPU (or its attention part)."""
        if not pairs:
            return 0.0
        return PrefillCost(self, peak_flops, attention_only).batch_seconds(pairs)

    def decode_step_seconds(self, batch: int, context_tokens: int) -> float:
        return self.decode_base_s + self.decode_per_request_s * batch + self.decode_per_context_token_s * context_tokens


class PrefillCost:
    """`ModelSpec.prefill_seconds` as the batcher's BatchCost: per request it sums the attended pairs under
    sparse attention (main attention), all attended pairs (the indexer) and the new tokens. The batcher
    prices a few candidate chunks per forward batch, so the model's constants are read once here."""

    __slots__ = ("attn_flops_per_pair", "indexer_flops_per_pair", "layers", "linear_flops", "overhead_s",
                 "topk", "useful_flops")

    def __init__(self, model: ModelSpec, peak_flops: float, attention_only: bool = False) -> None:
        self.topk, self.layers = model.topk, model.geometry.layers
        self.attn_flops_per_pair, self.indexer_flops_per_pair = model.attn_flops_per_pair, model.indexer_flops_per_pair
        self.linear_flops = 0.0 if attention_only else 2 * model.active_params
        self.overhead_s = 0.0 if attention_only else model.forward_overhead_s
        self.useful_flops = peak_flops * model.mfu

    def empty(self) -> tuple[float, float, float]:
        return 0.0, 0.0, 0.0

    def add(self, acc: tuple[float, float, float], cached: int, new: int) -> tuple[float, float, float]:
        sparse, full, tokens = acc
        return (sparse + attended_pairs(cached, new, self.topk), full + attended_pairs(cached, new, None),
                tokens + new)

    def seconds(self, acc: tuple[float, float, float]) -> float:
        sparse, full, tokens = acc
        flops = self.linear_flops * tokens + self.layers * (self.attn_flops_per_pair * sparse
                                                            + self.indexer_flops_per_pair * full)
        return self.overhead_s + flops / self.useful_flops

    def batch_seconds(self, pairs: Iterable[tuple[int, int]]) -> float:
        acc = self.empty()
        for cached, new in pairs:
            acc = self.add(acc, cached, new)
        return self.seconds(acc)


MODELS: dict[str, ModelSpec] = {
    # DeepSeek-V3.2: 37B active; MLA absorbed attention 128 heads x (576 + 512) x 2 FLOPs per pair and layer;
    # the indexer 64 heads x 128 dims x 2 in FP8 (counted at half cost); top-k 2048. DE HBM: 80 GB minus
    # 1/32 of the FP8 weights and activations leaves ~40 GB of KV; Basic's PE keeps ~24 GB for a batch's KV.
    "ds660b": ModelSpec(
        "ds660b", get_geometry("deepseek-v3.2"), 37e9, 128 * 1088 * 2, 64 * 128, 2048, 0.17, 0.02,
        0.020, 0.00035, 2e-9, 40 * 10**9 // (61 * 788), 24 * 10**9 // (61 * 788),
    ),
    # DS 27B (A.2): 30 layers, hidden 2560, 32 heads, 6 of 72 experts + 2 shared (intermediate 1536), one dense
    # layer (12288): ~3.8B active. Attention 32 x (192 + 128) x 2 per pair, indexer 32 x 64 x 2 at half, top-k 1024.
    "ds27b": ModelSpec(
        "ds27b", DS27B_GEOMETRY, 3.8e9, 32 * 320 * 2, 32 * 64, 1024, 0.20, 0.01,
        0.008, 0.0001, 1e-9, 60 * 10**9 // (30 * 788), 50 * 10**9 // (30 * 788),
    ),
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown simulated model {name!r}; choose from {', '.join(MODELS)}") from None
