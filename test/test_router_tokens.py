"""Text and chat prompts get hit estimates: the router tokenizes them as SGLang does (the tiny Llama served with
a small tokenizer built offline, test/data/tiny_tokenizer), so a repeated prompt's hit is found in the store and
read where the scheduler says, on the DE side too."""

from __future__ import annotations

import json
import random
import shutil
import urllib.request
from array import array
from pathlib import Path
from typing import Any

import pytest
from dualpath.cluster.local import ClusterConfig, LocalCluster
from dualpath.cluster.servers import tiny_model_with_layers
from dualpath.router.protocol import parse_request
from dualpath.router.store_view import StoreView
from dualpath.router.tokens import PromptTokenizer

pytest.importorskip("sglang", reason="the served tokenizer test needs `pip install sglang==0.5.17`")

TOKENIZER = Path(__file__).parent / "data" / "tiny_tokenizer"
WORDS = ("the", "agent", "reads", "a", "file", "and", "edits", "code", "then", "runs", "tests", "until", "every",
         "test", "passes")


def post(url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}{route}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def last_decision(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/dualpath/decisions?last=1", timeout=10) as response:
        return json.load(response)["decisions"][-1]


def test_text_and_chat_prompts_hit_the_store_and_read_on_the_de_side(tmp_path: Path) -> None:
    model = tiny_model_with_layers(tmp_path / "model", 2)
    for file in TOKENIZER.iterdir():
        shutil.copy(file, model / file.name)
    tokenizer = PromptTokenizer(str(model))
    rng = random.Random(3)
    text = " ".join(rng.choice(WORDS) for _ in range(1400))
    chat = {"model": "default", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": " ".join(rng.choice(WORDS) for _ in range(800))},
                         {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(600))}]}
    generate = {"text": text, "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    prompts = {route: list(tokenizer.with_ids(parse_request(route, json.dumps(body).encode(), set())).token_ids[0])
               for route, body in (("generate", generate), ("chat", chat))}
    assert all(len(ids) > 1300 for ids in prompts.values())

    # 625 kB/s a node: the router's alpha (3 s of reads) is ~900 tokens, less than each prompt's hit.
    config = ClusterConfig(tmp_path / "cluster", prefill=1, decode=1, nic_gbps=0.005, base_port=29400, model=model)
    cluster = LocalCluster(config)
    try:
        cluster.start()
        url = cluster.route("split")  # a hit the PE's NIC cannot read within alpha: split
        chat["model"] = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=10))["data"][0]["id"]
        for route, body in (("/generate", generate), ("/v1/chat/completions", chat)):
            post(url, route, body)
        assert cluster.wait_stored(list(prompts.values()), timeout_s=120), "the decode did not write the prompts"
        cluster.flush()
        store = StoreView(config.store_root)
        reads = {}
        for route, body in (("/generate", generate), ("/v1/chat/completions", chat)):
            before = {s.spec.node: s.report().read_tokens for s in cluster.servers}
            post(url, route, body)
            decision = last_decision(url)
            after = {s.spec.node: s.report().read_tokens for s in cluster.servers}
            reads[route] = {node: after[node] - before[node] for node in after}
            ids = prompts["generate" if route == "/generate" else "chat"]
            stored = len(ids) // 64 * 64
            # The router's estimate is the hit SGLang's own page keys find: the same ids, page by page.
            assert decision["cached_tokens"] == min(stored, len(ids) - 1), (route, decision)
            assert decision["side"] == "split" and sum(reads[route].values()) == decision["cached_tokens"]
            assert reads[route]["de0"] > 0 and reads[route]["pe0"] > 0, reads
            # Negative control: tokenized another way (a second <s> in front), the same prompt finds nothing.
            namespace = cluster.servers[0].report().store_namespace
            assert store.hit_tokens(array("I", [1, *ids]), namespace, 64) == 0 < store.hit_tokens(
                array("I", ids), namespace, 64)
    finally:
        cluster.stop()
