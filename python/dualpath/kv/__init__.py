"""KV geometry, SGLang-compatible block keys, and Full/Layer Block layouts."""

from dualpath.kv.geometry import PRESETS, KVGeometry, get_geometry
from dualpath.kv.keys import block_keys, namespace_seed
from dualpath.kv.layout import PAGE, BlockBuffer, BlockLayout, aligned_empty, as_bytes

__all__ = [
    "PAGE",
    "PRESETS",
    "BlockBuffer",
    "BlockLayout",
    "KVGeometry",
    "aligned_empty",
    "as_bytes",
    "block_keys",
    "get_geometry",
    "namespace_seed",
]
