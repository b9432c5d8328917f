"""Per-model KV-cache geometry: how many bytes one token occupies in one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["mha", "mla"]


@dataclass(frozen=True)
class KVGeometry:
    """KV-cache shape of one model.

    For MHA/GQA a token stores K and V: ``2 * kv_heads * head_dim`` elements per layer. For MLA it stores
    one latent of ``head_dim = kv_lora_rank + rope_dim`` elements (``kv_heads = 1``). Quantised caches
    that pack scales next to the values (DeepSeek-V3.2 FP8) set ``bytes_per_token_per_layer`` to the
    packed size, which is what the store and transfers move.
    """

    name: str
    layers: int
    bytes_per_token_per_layer: int
    dtype: str
    attention: Attention
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for field in ("layers", "bytes_per_token_per_layer", "kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVGeometry {self.name!r}: {field} must be positive")
        if self.attention not in ("mha", "mla"):
            raise ValueError(f"KVGeometry {self.name!r}: attention must be 'mha' or 'mla'")

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.bytes_per_token_per_layer


def _mha(name: str, layers: int, kv_heads: int, head_dim: int, dtype: str = "bfloat16") -> KVGeometry:
    element_bytes = _ELEMENT_BYTES[dtype]
    return KVGeometry(name, layers, 2 * kv_heads * head_dim * element_bytes, dtype, "mha", kv_heads, head_dim)


_ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}

PRESETS: dict[str, KVGeometry] = {
    g.name: g
    for g in (
        # 61 layers x (kv_lora_rank 512 + rope 64) x bf16 = 70,272 B/token.
        KVGeometry("deepseek-v3", 61, 576 * 2, "bfloat16", "mla", 1, 576),
        # FP8 MLA: 512 fp8 latent + 4 fp32 scales + 64 bf16 rope = 656 B/token/layer (indexer cache apart).
        KVGeometry("deepseek-v3.2", 61, 656, "float8_e4m3fn", "mla", 1, 576),
        _mha("qwen2.5-32b", layers=64, kv_heads=8, head_dim=128),  # 256 KiB/token
        _mha("llama-3-8b", layers=32, kv_heads=8, head_dim=128),  # 128 KiB/token
        # The dummy-weight Llama of reference/sglang-on-cpu.md: 2 layers, 2 KV heads, head_dim 64.
        _mha("tiny", layers=2, kv_heads=2, head_dim=64),
    )
}


def get_geometry(name: str) -> KVGeometry:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown KV geometry {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
