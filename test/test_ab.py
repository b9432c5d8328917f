"""The A/B's experiment design, without servers: the two modes take turns (round by round, alternating which
goes first; or in halves around the other's rounds where one set of servers runs at a time), every measured
round (and only those) is metered, goes through its own mode's router, and is settled before the next."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from dualpath.cluster.ab import _take_turns, schedule


class FakeReplay:
    def __init__(self, mode: str, rounds: int, events: list[tuple]) -> None:
        self.mode, self.rounds, self.events = mode, rounds, events
        self.measured_requests = 2 * (rounds - 1)
        self.metering = False
        self.url = ""

    def measured(self, index: int) -> bool:
        return index >= 1

    async def round(self, session: object, index: int) -> tuple[list[str], list[list[int]]]:
        assert self.url == f"http://{self.mode}"  # through its own mode's router
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
        self.serving = ""

    def serve(self, mode: str) -> str:
        if mode != self.serving:
            self.events.append(("swap", mode))
            self.serving = mode
        return f"http://{mode}"

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


def run_turns(one_set_at_a_time: bool) -> tuple[list[tuple], FakeProgress]:
    events: list[tuple] = []
    replays = {m: FakeReplay(m, 4, events) for m in ("baseline", "split")}
    progress = FakeProgress()
    steps = schedule(list(replays), 4, one_set_at_a_time)
    asyncio.run(_take_turns(FakeCluster(events), replays, {m: FakeMeter(r) for m, r in replays.items()}, steps,
                            progress))
    return events, progress


def test_modes_take_turns_round_by_round_and_only_measured_rounds_are_metered() -> None:
    events, progress = run_turns(one_set_at_a_time=False)
    rounds = [e[1:] for e in events if e[0] == "round"]
    assert rounds == [("baseline", 0, False), ("split", 0, False), ("split", 1, True), ("baseline", 1, True),
                      ("baseline", 2, True), ("split", 2, True), ("split", 3, True), ("baseline", 3, True)]
    # every round is settled (written back, caches flushed) before the next one starts
    kinds = [e[0] for e in events if e[0] != "swap"]
    assert kinds == ["round", "stored", "flush"] * 8
    assert progress.done == progress.totals == {"baseline": 6, "split": 6}


def test_one_set_of_servers_at_a_time_puts_the_baseline_in_halves_around_dualpath() -> None:
    events, progress = run_turns(one_set_at_a_time=True)
    rounds = [e[1:3] for e in events if e[0] == "round"]
    assert rounds == [("baseline", 0), ("baseline", 1), ("split", 0), ("split", 1), ("split", 2), ("split", 3),
                      ("baseline", 2), ("baseline", 3)]
    assert [e for e in events if e[0] == "swap"] == [("swap", "baseline"), ("swap", "split"), ("swap", "baseline")]
    assert progress.done == progress.totals == {"baseline": 6, "split": 6}


def test_the_schedule_gives_both_modes_every_round_in_order_and_the_same_mean_time() -> None:
    for one_set in (False, True):
        steps = schedule(("a", "b"), 6, one_set_at_a_time=one_set)
        for m in "ab":
            assert [i for mode, i in steps if mode == m] == list(range(6))
        assert sum(k for k, (m, _) in enumerate(steps) if m == "a") == sum(k for k, (m, _) in enumerate(steps)
                                                                             if m == "b")
    swaps = sum(a[0] != b[0] for a, b in itertools.pairwise(schedule(("a", "b"), 6, one_set_at_a_time=True)))
    assert swaps == 2
