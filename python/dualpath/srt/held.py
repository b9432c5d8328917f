"""The pages a decode holds in SGLang's host pool, by page key, so that it forwards them to a prefill from memory.

A decode writes every full page back to the store from its host pool (``batch_set_v1``) and reads its DE-side
hits into it (``batch_get_v1``); its radix cache keeps those pages there for the agent's next turn. When a
prefill later asks the decode for them (a DE-side or split read), reading them from the store again would spend
the storage NIC on bytes the decode already holds: the decode copies them from its host pool instead.

A page is known here from the moment its data is in the host pool until SGLang frees its host slot
(``HostKVCache.free``, hooked: :func:`on_host_free`) or a cache flush clears the pool. Every copy and every drop
takes the same lock, so a slot is never reused under a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from dualpath.srt import surface
from dualpath.srt.layers import host_pages


class HeldPages:
    """Page keys -> host-pool pages of one server (page-aligned host index / page size)."""

    def __init__(self, pool: Any, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self._page_of: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._lock = threading.Lock()
        surface.set_held_pages(pool, self)  # the free hook only sees the pool

    def __len__(self) -> int:
        return len(self._page_of)

    def add(self, keys: Iterable[str], first_index: Callable[[int], int]) -> None:
        """The i-th of ``keys`` is now in the host page starting at host index ``first_index(i)``."""
        with self._lock:
            for i, key in enumerate(keys):
                page = first_index(i) // self.page_size
                self._forget_page(page)
                self._forget_page(self._page_of.get(key, -1))
                self._page_of[key], self._key_of[page] = page, key

    def copy(self, key: str, target: torch.Tensor) -> bool:
        """Copy the page of ``key`` into the flat ``target``; False if this server does not hold it."""
        with self._lock:
            page = self._page_of.get(key)
            if page is None:
                return False
            source = surface.host_page(self.pool, page * self.page_size)
            target.view(source.shape).copy_(source)
            return True

    def drop(self, host_indices: torch.Tensor) -> None:
        """SGLang frees these host slots: their pages are no longer held."""
        pages = host_pages(host_indices, self.page_size)
        with self._lock:
            for page in pages:
                self._forget_page(page)

    def clear(self) -> None:
        with self._lock:
            self._page_of.clear()
            self._key_of.clear()

    def close(self) -> None:
        self.clear()
        surface.set_held_pages(self.pool, None)

    def _forget_page(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]


def on_host_free(original: Callable[..., Any], host_pool: Any, indices: torch.Tensor) -> Any:
    """AROUND ``HostKVCache.free``: the freed pages leave :class:`HeldPages` before their slots can be reused."""
    held = surface.held_pages(host_pool)
    if isinstance(held, HeldPages):
        held.drop(indices)
    return original(host_pool, indices)
