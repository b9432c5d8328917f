"""On-disk format of one block: a one-page header, then the Full Block padded to whole pages.

The data starts on a page boundary so that O_DIRECT reads land straight in the caller's page-aligned
buffer. Only the last partial page (when a Full Block is not a whole number of pages) goes through a
small bounce page. The header carries an xxh3-64 of the data and one of itself: a torn or corrupted file
fails one of them and is reported as a miss.
"""

from __future__ import annotations

import re
import struct
import threading
from typing import NamedTuple

import numpy as np
import xxhash

from dualpath.kv import PAGE, BlockLayout, aligned_empty
from dualpath.kv.layout import round_up

MAGIC = b"DPKVBLK1"
_HEADER = struct.Struct("<8sQQIII H128s")  # magic, data_len, data_xxh3, tokens, layers, bpl, key_len, key
_HEADER_SUM = struct.Struct("<Q")
KEY_PATTERN = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")


class CorruptBlock(Exception):
    """The bytes read are not a complete, intact block of the expected key and layout."""


class Scratch(NamedTuple):
    header: np.ndarray
    tail: np.ndarray


_scratch = threading.local()


def scratch(count: int) -> list[Scratch]:
    """Per-thread page-aligned header and bounce pages for ``count`` blocks (O_DIRECT needs both aligned)."""
    region = getattr(_scratch, "region", None)
    if region is None or region.nbytes < 2 * PAGE * count:
        region = _scratch.region = aligned_empty(2 * PAGE * count)
    return [Scratch(region[2 * PAGE * i : 2 * PAGE * i + PAGE], region[2 * PAGE * i + PAGE : 2 * PAGE * (i + 1)])
            for i in range(count)]


def check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"invalid block key {key!r}: expected 1-128 characters of [0-9A-Za-z_.-]")


class BlockFile:
    """Encodes and checks the blocks of one layout (``file_bytes`` each in a segment)."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.data_bytes = layout.full_block_bytes
        self.direct_bytes = self.data_bytes // PAGE * PAGE
        self.tail_bytes = self.data_bytes - self.direct_bytes
        self.file_bytes = PAGE + round_up(self.data_bytes)

    def iovecs(self, pages: Scratch, data: np.ndarray) -> list[np.ndarray]:
        """The (header, in-place data, bounce tail) list that moves one whole block in a preadv/pwritev."""
        vecs = [pages.header]
        if self.direct_bytes:
            vecs.append(data[: self.direct_bytes])
        if self.tail_bytes:
            vecs.append(pages.tail)
        return vecs

    def pack(self, key: str, data: np.ndarray, pages: Scratch) -> None:
        """Fill the scratch header (and tail page) for writing ``data`` under ``key``."""
        if self.tail_bytes:
            pages.tail[: self.tail_bytes] = data[self.direct_bytes :]
            pages.tail[self.tail_bytes :] = 0
        geometry = self.layout.geometry
        encoded = key.encode()
        header = _HEADER.pack(
            MAGIC,
            self.data_bytes,
            xxhash.xxh3_64_intdigest(data),
            self.layout.block_tokens,
            geometry.layers,
            geometry.bytes_per_token_per_layer,
            len(encoded),
            encoded,
        )
        header += _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(header))
        pages.header[:] = 0
        pages.header[: len(header)] = np.frombuffer(header, dtype=np.uint8)

    def unpack(self, key: str, data: np.ndarray, pages: Scratch, nread: int) -> None:
        """Check what one read brought in, finish the tail copy; raise CorruptBlock on any mismatch."""
        if nread != self.file_bytes:
            raise CorruptBlock(f"short file: {nread} of {self.file_bytes} bytes")
        raw = pages.header[: _HEADER.size + _HEADER_SUM.size].tobytes()
        (stored_sum,) = _HEADER_SUM.unpack_from(raw, _HEADER.size)
        if xxhash.xxh3_64_intdigest(raw[: _HEADER.size]) != stored_sum:
            raise CorruptBlock("header checksum mismatch")
        magic, data_len, data_sum, tokens, layers, bpl, key_len, stored_key = _HEADER.unpack_from(raw)
        geometry = self.layout.geometry
        expected = (MAGIC, self.data_bytes, self.layout.block_tokens, geometry.layers)
        if (magic, data_len, tokens, layers) != expected or bpl != geometry.bytes_per_token_per_layer:
            raise CorruptBlock("header describes another format or layout")
        if stored_key[:key_len].decode(errors="replace") != key:
            raise CorruptBlock("file holds another key")
        if self.tail_bytes:
            data[self.direct_bytes :] = pages.tail[: self.tail_bytes]
        if xxhash.xxh3_64_intdigest(data) != data_sum:
            raise CorruptBlock("data checksum mismatch")
