"""The router's decision overhead per request at 64 engines (32 prefill + 32 decode, one node each).

Times the production decision path without HTTP: the hit estimate (block keys of the prompt, then the
store's stored prefix, in a real store directory) and the global scheduler's submit, PE fetch and DE fetch
with the loads of all 64 engines, for agent sessions whose every turn resends the conversation plus ~429
new tokens (the paper's trace: 32.7K tokens of context on average). Up to 128 requests are in flight;
polls (every 100 decisions) bring fresh node read queues. The same requests are then decided in baseline
mode (every read on the PE side).

With ``--tokenizer PATH`` the sessions are chat conversations instead (a first message of the same context,
then one message of ~429 tokens a turn) sent as OpenAI chat bodies, and the timed path is what the router
does for them: parse the body, tokenize it as far as the store's hit reaches (chat template, segment cache,
store probe; ``router/tokens.py``), then decide; the baseline is the same decisions given the token ids (no
parse, no tokenizer), and a diagnostic the same bodies tokenized whole before deciding (no probe).

    .venv/bin/python benchmark/router_bench.py [--sessions 32] [--turns 40] [--engines 64] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from array import array
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
from dualpath.kv import block_keys
from dualpath.router.config import PrefillSpec, RouterConfig
from dualpath.router.decide import Decider
from dualpath.router.engines import EngineRegistry
from dualpath.router.protocol import ParsedRequest, parse_request
from dualpath.router.store_view import StoreView
from dualpath.router.tokens import PromptTokenizer
from dualpath.scheduler.report import KVChannelAddress, NodeReport
from dualpath.store import BlockStore, StoreConfig

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 64
NEW_TOKENS_PER_TURN = 429
IN_FLIGHT = 128
POLL_EVERY = 100


class Turn(NamedTuple):
    session: int
    prompt: list[int]
    body: bytes = b""  # a chat request's JSON (with --tokenizer)


def sessions(count: int, turns: int, seed: int) -> tuple[list[Turn], list[list[str]]]:
    """Turns in arrival order (sessions interleaved; 16K-32K tokens of context growing by 429 a turn) and
    the block keys of each session's last prompt, of which every earlier prompt is a prefix."""
    rng = np.random.default_rng(seed)
    finals = [rng.integers(0, 100_000, int(rng.integers(16_000, 32_000)) + turns * NEW_TOKENS_PER_TURN).tolist()
              for _ in range(count)]
    order = [Turn(s, finals[s][:len(finals[s]) - (turns - t) * NEW_TOKENS_PER_TURN])
             for t in range(turns) for s in range(count)]
    return order, [block_keys(final, BLOCK) for final in finals]


def chat_sessions(count: int, turns: int, seed: int, tokenizer: PromptTokenizer) -> list[Turn]:
    """Chat turns in arrival order: a first message of 16K-32K tokens of context, then a ~429-token message a
    turn; each with its body and the token ids SGLang computes for it (the store's keys)."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted({word for i in range(len(tokenizer.tokenizer)) if (word := tokenizer.tokenizer.decode([i])
                                                                          .strip()).isalpha()})
    sample = " ".join(rng.choice(vocabulary, 1000))
    tokens_per_word = len(tokenizer.encode(sample, False)) / 1000

    def words(tokens: int) -> str:  # text of about ``tokens`` tokens in the tokenizer's own words
        return " ".join(rng.choice(vocabulary, max(1, int(tokens / tokens_per_word))))

    conversations = [[{"role": "system", "content": words(int(rng.integers(16_000, 32_000)))}] for _ in range(count)]
    order = []
    for _ in range(turns):
        for session, messages in enumerate(conversations):
            messages.append({"role": "user" if len(messages) % 2 else "assistant",
                             "content": words(NEW_TOKENS_PER_TURN)})
            body = msgspec.json.encode({"model": "m", "messages": messages})
            ids = tokenizer.with_ids(parse_request("chat", body, set())).token_ids[0]
            order.append(Turn(session, ids.tolist(), body))
    return order


def ready_registry(config: RouterConfig, namespace: str) -> EngineRegistry:
    """Engines as a poll would have left them: up, on their own nodes, with KV channels."""
    registry = EngineRegistry(config, on_change=lambda: None)
    for engine in registry.engines:
        engine.discovered = engine.dualpath = True
        engine.set_up(True)
        engine.node = f"node-{engine.role[0]}{engine.engine_id}"
        engine.node_id = registry.node_ids.setdefault(engine.node, len(registry.node_ids))
        channel = KVChannelAddress(f"agent-{engine.engine_id}", "127.0.0.1", 31000 + engine.engine_id)
        engine.report = NodeReport(role=engine.role, node=engine.node, model="m", page_size=BLOCK, kv_channel=channel,
                                   store_namespace=namespace)
        engine.capacity_tokens = 2_000_000
    return registry


class Timings(NamedTuple):
    """Per decision, in µs: wall-clock time, CPU time of the thread (what other tenants of a shared machine
    cannot inflate), and the wall-clock time of the decisions that were a session's first turn."""

    wall: list[float]
    cpu: list[float]
    first_turn: list[float]


async def decide_all(mode: str, engines: int, root: Path, turns: list[Turn], keys: list[list[str]],
                     writer: BlockStore, tokenizer: PromptTokenizer | None, probe: bool) -> Timings:
    """Time the decision of every request, in arrival order."""
    half = engines // 2
    config = RouterConfig(tuple(PrefillSpec(f"http://127.0.0.1:{20000 + i}") for i in range(half)),
                          tuple(f"http://127.0.0.1:{21000 + i}" for i in range(half)),
                          mode=mode, store_root=root, store_namespace=writer.config.namespace,  # type: ignore[arg-type]
                          store_block_tokens=BLOCK, read_tokens_per_s=2e6, gpu_tokens_per_s=1e5)
    store = StoreView(root)
    registry = ready_registry(config, writer.config.namespace)
    decider = Decider(config, registry, store)
    rng = np.random.default_rng(7)
    in_flight: deque = deque()
    timings = Timings([], [], [])
    written = [0] * (max(turn.session for turn in turns) + 1)
    for index, (session, prompt, body) in enumerate(turns):
        if index % POLL_EVERY == 0:  # a poll: new node reports (the charges of placed reads are forgotten)
            for engine in registry.engines:
                engine.report = msgspec.structs.replace(engine.report, queued_tokens=int(rng.integers(0, 8_000_000)))
                engine.reported_at = time.monotonic()
                engine.version += 1
            registry.polls += 1
        ids = array("I", prompt)
        parsed = ParsedRequest("generate", {}, False, None, (ids,), 0, 176, None)
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        if tokenizer is not None:  # what the router does for a chat body: parse, tokenize, then decide
            parsed = tokenizer.with_ids(parse_request("chat", body, set()), decider.probe if probe else None)
        placement = await decider.place(parsed)
        cpu = (time.thread_time_ns() - start_cpu) / 1e3
        elapsed = (time.perf_counter_ns() - start) / 1e3
        timings.wall.append(elapsed)
        timings.cpu.append(cpu)
        if not written[session]:
            timings.first_turn.append(elapsed)
        in_flight.append(placement)
        if len(in_flight) > IN_FLIGHT:
            done = in_flight.popleft()
            decider.release_prefill(done)
            decider.release_decode(done)
        full = len(prompt) // BLOCK  # the decode writes the turn's new blocks back for the next turn
        if keys:
            turn_keys = keys[session][written[session]:full]
        else:  # a chat's prompt is not a prefix of the next turn's (the generation prompt): its own keys
            turn_keys = [key for key in block_keys(prompt, BLOCK) if not writer.index.exists(key)]
        for key in turn_keys:
            path = writer.path(key)
            path.parent.mkdir(exist_ok=True)
            path.touch()
        written[session] = full
        if tokenizer is not None:  # the agent's think time, which the bench does not replay, covers this
            tokenizer.wait_background()
    return timings


class Stats(NamedTuple):
    p50: float
    p99: float
    warm_p99: float  # after each session's first turn
    first_turn_p50: float
    cpu_p50: float

    @classmethod
    def of(cls, timings: Timings, sessions: int) -> Stats:
        wall = np.asarray(timings.wall)
        return cls(float(np.median(wall)), float(np.percentile(wall, 99)), float(np.percentile(wall[sessions:], 99)),
                   float(np.median(timings.first_turn)), float(np.median(timings.cpu)))

    def line(self, name: str) -> str:
        return (f"  {name:9s} p50 {self.p50:8.1f} us   p99 {self.p99:8.1f} us   p99 after a session's first turn "
                f"{self.warm_p99:8.1f} us   first turn p50 {self.first_turn_p50:8.1f} us   "
                f"CPU p50 {self.cpu_p50:7.1f} us")


def write(records: list[dict], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


def run(engines: int, mode: str, turns: list[Turn], keys: list[list[str]],
        tokenizer: PromptTokenizer | None = None, probe: bool = True) -> Timings:
    """Time ``turns`` in ``mode`` against a fresh store directory (chat bodies tokenized as far as the store's
    hit with ``probe``, else whole)."""
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        root = Path(tmp)
        with BlockStore(StoreConfig(root, "tiny", BLOCK, node="writer", io_threads=1)) as writer:
            return asyncio.run(decide_all(mode, engines, root, turns, keys, writer, tokenizer, probe))


def _record(metric: str, value: float, baseline_value: float, baseline: str, target: str, load: float) -> dict:
    return {"metric": metric, "value": value, "unit": "us", "baseline": baseline, "baseline_value": baseline_value,
            "ratio": value / baseline_value, "target": target,
            "command": "python " + " ".join(["benchmark/router_bench.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                       f"load average {load:.1f} at start (a shared machine)",
            "date": datetime.now(UTC).date().isoformat()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--engines", type=int, default=64, help="prefill + decode servers (half each)")
    parser.add_argument("--tokenizer", type=Path, help="chat sessions through this tokenizer (see the docstring)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if args.tokenizer is not None:
        return tokenized(args, load)
    order, keys = sessions(args.sessions, args.turns, seed=1)
    mean_context = np.mean([len(turn.prompt) for turn in order])
    # Whichever mode ran first paid the process's warm-up on its first turns (~300 us each, measured):
    # a router that serves is warm, so both modes are timed after a pass that is thrown away.
    run(args.engines, "dualpath", order[:2 * args.sessions], keys)
    stats = {mode: Stats.of(run(args.engines, mode, order, keys), args.sessions) for mode in ("dualpath", "baseline")}
    print(f"{args.engines} engines, {len(order)} requests, mean context {mean_context:,.0f} tokens "
          f"({args.sessions} sessions x {args.turns} turns); load average {load:.1f} at start")
    for mode, stat in stats.items():
        print(stat.line(mode))
    (p50, p99, _, cold, cpu), (b50, b99, _, bcold, bcpu) = stats["dualpath"], stats["baseline"]
    where = f"{args.engines} engines, {mean_context / 1000:.1f}K-token agent prompts"
    records = [
        _record("router_decision_p50", p50, b50, f"baseline-mode decision, same requests ({where})", "< 1000 us",
                load),
        _record("router_decision_p99", p99, b99, f"baseline-mode decision, same requests ({where})", "< 1000 us",
                load),
        _record("router_decision_first_turn_p50", cold, bcold,
                f"baseline mode; a session's first turn hashes every block ({where})", "< 1000 us", load),
        _record("router_decision_cpu_time_p50", cpu, bcpu, f"baseline-mode decision, same requests ({where})",
                "< 1000 us", load),
    ]
    write(records, "router_bench.json")
    return 0


def tokenized(args: argparse.Namespace, load: float) -> int:
    """Chat bodies parsed, tokenized and decided vs the same decisions given their ids, and vs the same bodies
    tokenized whole before the decision (no store probe); tokenizer caches cold."""
    order = chat_sessions(args.sessions, args.turns, 1, PromptTokenizer(str(args.tokenizer)))
    mean_context = np.mean([len(turn.prompt) for turn in order])
    run(args.engines, "dualpath", order[:2 * args.sessions], [])  # warm-up pass, thrown away
    chat = Stats.of(run(args.engines, "dualpath", order, [], PromptTokenizer(str(args.tokenizer))), args.sessions)
    ids = Stats.of(run(args.engines, "dualpath", order, []), args.sessions)
    whole = Stats.of(run(args.engines, "dualpath", order, [], PromptTokenizer(str(args.tokenizer)), probe=False),
                     args.sessions)
    print(f"{args.engines} engines, {len(order)} chat requests, mean context {mean_context:,.0f} tokens "
          f"({args.sessions} sessions x {args.turns} turns, tokenizer {args.tokenizer}); load {load:.1f} at start")
    print(chat.line("chat"))
    print(ids.line("ids"))
    print(whole.line("whole"))
    (p50, p99, warm99, cold, _), (b50, b99, bwarm99, bcold, _) = chat, ids
    where = f"{args.engines} engines, {mean_context / 1000:.1f}K-token chat prompts"
    baseline = f"the same decisions given the token ids ({where})"
    whole_baseline = f"the same chat bodies tokenized whole before the decision ({where})"
    records = [_record("router_tokenize_and_decide_p50", p50, b50, baseline, "< 1000 us", load),
               _record("router_tokenize_and_decide_p99", p99, b99, baseline, "< 1000 us", load),
               _record("router_tokenize_and_decide_p99_after_first_turn", warm99, bwarm99, baseline, "< 1000 us",
                       load),
               _record("router_tokenize_and_decide_first_turn_p50", cold, bcold, baseline, "diagnostic", load),
               _record("router_tokenize_and_decide_p99_vs_whole", p99, whole.p99, whole_baseline, "diagnostic", load),
               _record("router_tokenize_and_decide_first_turn_p50_vs_whole", cold, whole.first_turn_p50,
                       whole_baseline, "diagnostic", load)]
    write(records, "router_bench_tokenized.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
