"""Typed messages between engines, the router and the global scheduler.

Token counts are the load unit everywhere (the paper: GPU, disk and network load all track tokens).
A request's `total_tokens` (hit + new) is its `len_r`; `tok_e` sums it over an engine's unfinished requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Role = Literal["prefill", "decode"]


class ReadSide(Enum):
    """Which node's storage NIC reads a request's hit KV."""

    PE = "pe"
    DE = "de"
    SPLIT = "split"
    NONE = "none"  # nothing to read (no hit tokens)


@dataclass(frozen=True, slots=True)
class Request:
    """One prefill+decode job: `cached_tokens` hit the store, `new_tokens` are computed, `gen_tokens` decoded."""

    request_id: int
    cached_tokens: int
    new_tokens: int
    gen_tokens: int
    # Derived once: the scheduler reads them many times per decision.
    total_tokens: int = field(init=False, repr=False)
    hbm_tokens: int = field(init=False, repr=False)  # KV slots a DE holds for the whole decode

    def __post_init__(self) -> None:
        if self.cached_tokens < 0 or self.new_tokens < 1 or self.gen_tokens < 0:
            raise ValueError(
                f"request {self.request_id}: need cached_tokens >= 0, new_tokens >= 1, gen_tokens >= 0; got "
                f"{self.cached_tokens}, {self.new_tokens}, {self.gen_tokens}"
            )
        object.__setattr__(self, "total_tokens", self.cached_tokens + self.new_tokens)
        object.__setattr__(self, "hbm_tokens", self.total_tokens + self.gen_tokens)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine reports when its group fetches: `seq_e`, `tok_e` and (DEs only) free HBM in tokens."""

    engine_id: int
    node_id: int
    seq: int
    tok: int
    free_hbm_tokens: int = 0


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """A node's storage read queue (`read_q`, tokens queued or in flight) and how fast it drains (tokens/s)."""

    node_id: int
    read_q: int
    drain_tokens_per_s: float = 1.0


@dataclass(frozen=True, slots=True)
class EngineGroup:
    """Engines that fetch together through their leader (rank 0). All-PE or all-DE; one node stays in one group."""

    group_id: int
    role: Role
    engine_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.engine_ids:
            raise ValueError(f"engine group {self.group_id} has no engines")


@dataclass(frozen=True, slots=True)
class PrefillPick:
    """A request placed on a PE; it now waits for a DE."""

    request: Request
    pe: int
    pe_tokens: int  # the PE's tok_e once it took the request (its unfinished prompt tokens, this one's included)


@dataclass(frozen=True, slots=True)
class Assignment:
    """The full decision for one request: PE, DE and how its hit tokens are read on each side.

    A split read may also have a helper, another DE that reads a middle part of the hit and forwards it to
    the PE (``-1`` for none): the DE reads the leading ``de_read_tokens``, the helper the next
    ``helper_read_tokens``, the PE the rest.
    """

    request: Request
    pe: int
    de: int
    side: ReadSide
    pe_read_tokens: int
    de_read_tokens: int
    helper: int = -1
    helper_read_tokens: int = 0
