"""The A/B's experiment design, without servers: the two modes take turns round by round, alternating which
goes first, every measured round (and only those) is metered, and every round is settled before the next."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from dualpath.cluster.ab import _take_turns


class FakeReplay:
    def __init__(self, mode: str, rounds: int, events: list[tuple]) -> None:
        self.mode, self.rounds, self.events = mode, rounds, events
        self.measured_requests = 2 * (rounds - 1)
        self.metering = False

    def measured(self, index: int) -> bool:
        return index >= 1

    async def round(self, session: object, index: int) -> tuple[list[str], list[list[int]]]:
        self.events.append(("round", self.mode, index, self.metering))
        return [f"{self.mode}{index}a", f"{self.mode}{index}b"], [[index]]


class FakeMeter:
    def __init__(self, replay: FakeReplay) -> None:
        self.replay = replay

    @contextmanager
    def round(self) -> Iterator[None]:
        self.replay.metering = True
        try:
            yield
        finally:
            self.replay.metering = False


class FakeCluster:
    def __init__(self, events: list[tuple]) -> None:
        self.events = events

    def wait_stored(self, prompts: list[list[int]]) -> bool:
        self.events.append(("stored", prompts[0][0]))
        return True

    def flush(self) -> None:
        self.events.append(("flush",))


class FakeProgress:
    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def add_task(self, description: str, total: int) -> str:
        self.totals[description.strip()] = total
        self.done[description.strip()] = 0
        return description.strip()

    def advance(self, task: str, count: int) -> None:
        self.done[task] += count


def test_modes_take_turns_round_by_round_and_only_measured_rounds_are_metered() -> None:
    events: list[tuple] = []
    replays = {m: FakeReplay(m, 4, events) for m in ("baseline", "split")}
    progress = FakeProgress()
    asyncio.run(_take_turns(FakeCluster(events), replays, {m: FakeMeter(r) for m, r in replays.items()}, progress))
    rounds = [e[1:] for e in events if e[0] == "round"]
    assert rounds == [("baseline", 0, False), ("split", 0, False), ("split", 1, True), ("baseline", 1, True),
                      ("baseline", 2, True), ("split", 2, True), ("split", 3, True), ("baseline", 3, True)]
    # every round is settled (written back, caches flushed) before the next one starts
    kinds = [e[0] for e in events]
    assert kinds == ["round", "stored", "flush"] * 8
    assert progress.done == progress.totals == {"baseline": 6, "split": 6}
