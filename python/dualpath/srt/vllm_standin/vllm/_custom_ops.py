"""Torch-native ``rotary_embedding`` with vLLM's in-place signature, for SGLang on CPU without vLLM."""

from __future__ import annotations

import torch


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    positions = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(positions.numel(), -1, head_size)
        rot = heads[..., : 2 * cos.shape[-1]]
        r = rot.float()
        a, b = r.chunk(2, dim=-1) if is_neox else (r[..., ::2], r[..., 1::2])
        first, second = a * cos - b * sin, b * cos + a * sin
        out = torch.cat((first, second), -1) if is_neox else torch.stack((first, second), -1).flatten(-2)
        rot.copy_(out.to(x.dtype))
