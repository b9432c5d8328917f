"""What the A/B replay sends, without servers: Mooncake's requests grouped into the conversations their shared
prefixes reveal, and prompts built from the trace's content ids, so that requests share exactly the prefixes
the trace says they share."""

from __future__ import annotations

import argparse

import pytest
from dualpath.cluster.cli import select_agents
from dualpath.cluster.replay import AgentHistory, Replay
from dualpath.traces import AgentTrace, Turn, load_mooncake, mooncake_sessions


def _request(index: int, blocks: tuple[int, ...], prompt: int) -> AgentTrace:
    return AgentTrace(f"r{index}", (Turn(0, prompt, 4, blocks=blocks),), float(index), 512)


def test_requests_sharing_two_leading_blocks_form_one_session_and_its_contexts_come_from_it() -> None:
    requests = [_request(0, (0, 1, 2), 1200), _request(1, (0, 5), 700), _request(2, (0, 1, 2, 3), 1800),
                _request(3, (0, 1, 9), 1300), _request(4, (0, 5, 6), 1100)]
    sessions = mooncake_sessions(requests)
    assert [s.agent_id for s in sessions] == ["r0-session", "r1-session"]
    assert [[t.blocks for t in s.turns] for s in sessions] == [[(0, 1, 2), (0, 1, 2, 3), (0, 1, 9)],
                                                               [(0, 5), (0, 5, 6)]]
    # A session's first turn has no context of its own, though block 0 (every conversation's system prompt)
    # was sent by another session; later turns count the blocks their session sent before.
    assert [[t.context_tokens for t in s.turns] for s in sessions] == [[0, 1536, 1024], [0, 1024]]
    assert all(t.prompt_tokens == r.turns[0].prompt_tokens for s in sessions for t in s.turns
               for r in requests if r.turns[0].blocks == t.blocks)
    with pytest.raises(ValueError, match="one-turn requests with blocks"):
        mooncake_sessions([AgentTrace("x", (Turn(0, 10, 1), Turn(10, 5, 1)))])


def test_the_shipped_mooncake_sample_splits_into_sessions_that_keep_every_request() -> None:
    requests = load_mooncake()
    sessions = mooncake_sessions(requests)
    assert sum(len(s.turns) for s in sessions) == len(requests)
    assert sum(len(s.turns) >= 4 for s in sessions) >= 6  # enough for the default A/B (6 agents x 4 turns)
    for session in sessions:
        assert [t.blocks[:2] == session.turns[0].blocks[:2] for t in session.turns[1:]] == [True] * (
            len(session.turns) - 1)


def test_prompts_from_blocks_share_exactly_the_shared_blocks_and_nothing_across_seeds() -> None:
    scale, block = 0.25, 128  # a 512-token block at scale 0.25
    session = AgentTrace("s", (Turn(0, 1500, 4, blocks=(0, 1, 2)), Turn(1024, 900, 4, blocks=(0, 1, 7, 8))),
                         0.0, 512)
    other = AgentTrace("o", (Turn(0, 700, 4, blocks=(0, 9)),), 0.0, 512)
    cache: dict[int, list[int]] = {}
    first, second = AgentHistory(session, 1, scale, cache), AgentHistory(other, 1, scale, cache)
    (turn0, context0), (turn1, context1) = first.prompt(0), first.prompt(1)
    assert (len(turn0), len(turn1), context0, context1) == (375, 481, 0, 256)
    assert turn1[:2 * block] == turn0[:2 * block] and turn1[2 * block] != turn0[2 * block]
    other0, _ = second.prompt(0)
    assert other0[:block] == turn0[:block] and other0[block] != turn0[block]
    reseeded, _ = AgentHistory(session, 2, scale, {}).prompt(0)
    assert reseeded[:block] != turn0[:block]  # another replay's KV serves none of this one's


def test_the_default_mooncake_ab_measures_requests_with_hits() -> None:
    args = argparse.Namespace(trace="mooncake", trace_path=None, turns=4, scale=0.25, max_context=20_000,
                              agents=6)
    agents = select_agents(args)
    assert len(agents) == 6 and Replay("http://127.0.0.1:1", agents).measured_requests == 18
    measured = [t for a in agents for t in a.turns[1:]]
    assert sum(t.context_tokens for t in measured) / sum(t.prompt_tokens for t in measured) > 0.8
