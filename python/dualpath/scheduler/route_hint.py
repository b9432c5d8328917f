"""The per-request read path, as the router tells it to the prefill and decode servers.

SGLang 0.5.17 carries an opaque ``routing_key`` from the request to the scheduler's ``Req`` (the
``routing_key`` field of ``/generate``, the ``X-SMG-Routing-Key`` header of the OpenAI routes), and uses
it for metrics only. DualPath rides on it, e.g.
``dualpath/1;side=de;pe=pe-node0@127.0.0.1:31001;de=de-node1@127.0.0.1:31002``: the KV channels (agent
name and control address) of the chosen PE and DE, so that either side can reach the other. A split read
(``side=split;...;de_tokens=1024``) has the DE read the leading ``de_tokens`` hit tokens and the PE the
rest; with ``help=<channel>;help_tokens=512`` another DE reads the next ``help_tokens`` for the PE. A client's
own routing key travels last, percent-encoded (``key=session%3B42``), and the servers give it back to SGLang.
A request without a DualPath key takes the PE read path, which is stock SGLang behaviour.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

from dualpath.kv import block_keys
from dualpath.scheduler.messages import ReadSide
from dualpath.scheduler.report import KVChannelAddress

PREFIX = "dualpath/1"
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"


Reader = KVChannelAddress | None  # a DE's KV channel (its rank 0), or None: the prefill's own storage NIC


class ReadPlan(NamedTuple):
    """Who reads one request's hit tokens, in prompt order: runs of ``(reader, tokens)``, the last of which reads
    whatever hit is left. The one description of a read split: the router charges each reader's node with it,
    and the servers find each page's reader in it."""

    runs: tuple[tuple[Reader, int], ...]

    @property
    def readers(self) -> list[Reader]:
        return [reader for reader, _ in self.runs]

    def tokens(self, hit: int) -> list[tuple[Reader, int]]:
        """Of ``hit`` stored tokens, how many each reader reads."""
        split, left = [], hit
        for i, (reader, tokens) in enumerate(self.runs):
            take = left if i == len(self.runs) - 1 else min(tokens, left)
            split.append((reader, take))
            left -= take
        return split

    def page_readers(self, input_ids: list[int], page_size: int) -> dict[str, Reader]:
        """The reader of each page (by SGLang page key) that a run before the last reads: whole pages only; every
        other page is the last reader's (:meth:`reader`)."""
        pages = [(reader, tokens // page_size) for reader, tokens in self.runs[:-1]]
        end = min(sum(n for _, n in pages), len(input_ids) // page_size)
        keys = iter(block_keys(input_ids[: end * page_size], page_size))
        return {key: reader for reader, n in pages for key in itertools.islice(keys, n)}

    def reader(self, key: str, page_readers: Mapping[str, Reader]) -> Reader:
        return page_readers.get(key, self.runs[-1][0])


@dataclass(frozen=True)
class RouteHint:
    """Where the hit KV of one request is read; for the DE side, the KV channels of both engines.

    Channels come from the servers' ``/dualpath/info`` reports.
    """

    side: ReadSide
    pe_channel: KVChannelAddress | None = None
    de_channel: KVChannelAddress | None = None
    de_tokens: int = 0  # split reads: the leading hit tokens the DE reads
    helper_channel: KVChannelAddress | None = None  # split reads: another DE that reads the next ``helper_tokens``
    helper_tokens: int = 0
    client_key: str = ""  # the client's own routing key, kept (the servers give it back to SGLang)

    def __post_init__(self) -> None:
        if self.side not in (ReadSide.PE, ReadSide.DE, ReadSide.SPLIT):
            raise ValueError(f"a route hint reads on the PE side, the DE side or both, not {self.side}")
        if self.side is not ReadSide.PE and not (self.pe_channel and self.de_channel):
            raise ValueError(f"a {self.side.value}-side route hint needs the KV channels of both the PE and the DE")
        if self.de_tokens < 0 or self.helper_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got de_tokens={self.de_tokens}, "
                             f"help_tokens={self.helper_tokens}")
        if (self.de_tokens + self.helper_tokens > 0) != (self.side is ReadSide.SPLIT):
            raise ValueError(f"de_tokens or help_tokens > 0 go with a split read and only with it; got "
                             f"{self.side.value} with de_tokens={self.de_tokens}, help_tokens={self.helper_tokens}")
        if (self.helper_channel is not None) != (self.helper_tokens > 0):
            raise ValueError(f"a helper needs both its channel and help_tokens > 0; got {self.helper_channel} "
                             f"with help_tokens={self.helper_tokens}")

    @property
    def plan(self) -> ReadPlan:
        """The read plan this hint carries: the DE reads the leading ``de_tokens``, the helper the next
        ``helper_tokens``, the prefill the rest (DE side: the DE reads everything; PE side: the prefill)."""
        if self.side is ReadSide.PE:
            return ReadPlan(((None, 0),))
        if self.side is ReadSide.DE:
            return ReadPlan(((self.de_channel, 0),))
        helper = ((self.helper_channel, self.helper_tokens),) if self.helper_tokens else ()
        return ReadPlan(((self.de_channel, self.de_tokens), *helper, (None, 0)))

    def encode(self) -> str:
        fields = [PREFIX, f"side={self.side.value}"]
        if self.side is not ReadSide.PE:
            fields += [f"pe={self.pe_channel}", f"de={self.de_channel}"]
        if self.de_tokens:
            fields.append(f"de_tokens={self.de_tokens}")
        if self.helper_tokens:
            fields += [f"help={self.helper_channel}", f"help_tokens={self.helper_tokens}"]
        if self.client_key:
            fields.append(f"key={quote(self.client_key, safe='')}")
        return ";".join(fields)

    @staticmethod
    def decode(routing_key: str | None) -> RouteHint | None:
        """The hint in ``routing_key``, or None when the key is absent or not DualPath's."""
        if not routing_key or not routing_key.startswith(PREFIX + ";"):
            return None
        try:
            fields = dict(item.split("=", 1) for item in routing_key.split(";")[1:])
            pe, de, helper = (KVChannelAddress.parse(fields[k]) if k in fields else None for k in ("pe", "de", "help"))
            return RouteHint(ReadSide(fields["side"]), pe, de, int(fields.get("de_tokens", 0)), helper,
                             int(fields.get("help_tokens", 0)), unquote(fields.get("key", "")))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"malformed DualPath routing key {routing_key!r}: {exc}") from exc
