"""Chained block keys, byte-identical to SGLang HiCache page keys.

SGLang (``mem_cache/utils.py::get_hash_str``) keys page ``i`` as
``sha256(digest_{i-1} || uint32-LE token ids of page i)`` in hex, with no prior digest for the first page.
Keys therefore name a whole prefix: two engines that saw the same tokens find each other's blocks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_UINT32_MAX = 2**32 - 1
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def namespace_seed(namespace: str) -> str:
    """Prior key that separates key spaces (tenants, LoRA adapters, salts) sharing one store."""
    return hashlib.sha256(b"dualpath-namespace\0" + namespace.encode()).hexdigest()


def block_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_tokens: int,
    prior_key: str | None = None,
    namespace: str | None = None,
) -> list[str]:
    """Keys of every complete block of ``token_ids`` (a trailing partial block gets none).

    ``prior_key`` continues a chain (the key of the block just before ``token_ids``). ``namespace``
    starts a separate chain; without it the keys equal SGLang's page keys for ``page_size=block_tokens``.
    """
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    if prior_key is not None and namespace is not None:
        raise ValueError("give prior_key or namespace, not both: a continued chain already has its seed")
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > _UINT32_MAX):
        raise ValueError("token ids must fit in uint32 (SGLang hashes them as uint32-LE)")
    seed = namespace_seed(namespace) if namespace is not None else prior_key
    if seed and not _DIGEST.fullmatch(seed):
        raise ValueError(f"prior key must be a 64-character SHA-256 hex digest, got {seed!r}")
    prior = bytes.fromhex(seed) if seed else b""
    full = tokens.size // block_tokens
    pages = tokens[: full * block_tokens].astype("<u4").reshape(full, block_tokens)
    keys = []
    for page in pages:
        prior = hashlib.sha256(prior + page.tobytes()).digest()
        keys.append(prior.hex())
    return keys
