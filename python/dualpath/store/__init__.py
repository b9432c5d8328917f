"""3FS-style block store of Full Blocks: POSIX O_DIRECT or 3FS USRBIO underneath, shared by processes."""

from dualpath.store.capacity import Evicted
from dualpath.store.config import StoreConfig
from dualpath.store.node import ReadQueue
from dualpath.store.store import BlockStatus, BlockStore, StoreStats

__all__ = ["BlockStatus", "BlockStore", "Evicted", "ReadQueue", "StoreConfig", "StoreStats"]
