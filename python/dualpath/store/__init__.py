"""3FS-style block store of Full Blocks: POSIX O_DIRECT or 3FS USRBIO underneath, shared by processes."""

from dualpath.store.capacity import Evicted
from dualpath.store.config import StoreConfig
from dualpath.store.index import StoreIndex, drop_all_blocks
from dualpath.store.node import NodeReader, ReadQueue, node_dir
from dualpath.store.store import BlockStatus, BlockStore, StoreStats

__all__ = ["BlockStatus", "BlockStore", "Evicted", "NodeReader", "ReadQueue", "StoreConfig", "StoreIndex", "StoreStats",
           "drop_all_blocks", "node_dir"]
