"""Tensor parallelism on CPU: SGLang's own TP=2 (gloo collectives, through DualPath's CPU support) gives the
logprobs of TP=1, and a DualPath server at TP=2, which this version does not serve, stops with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_srt import LOGPROBS, SAMPLING, _post, _prompt, same_logprobs, top_logprobs, with_random_weights

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")


def test_tp2_on_cpu_gives_the_logprobs_of_tp1_and_dualpath_refuses_it_clearly(tmp_path: Path) -> None:
    from dualpath.cluster.servers import (
        TINY_MODEL,
        ServerOptions,
        ServerSpec,
        ServerStartError,
        start_servers,
        stop_servers,
    )

    model = with_random_weights(TINY_MODEL, tmp_path / "tiny_llama")
    options = ServerOptions(tmp_path / "store", tmp_path / "logs", model, max_total_tokens=8192,
                            extra_args=("--load-format", "safetensors"))
    specs = [ServerSpec("null", 31800, dualpath=False), ServerSpec("null", 31810, dualpath=False,
                                                                   extra_args=("--tp", "2"))]
    servers = start_servers(specs, options, timeout_s=400)
    try:
        answers = []
        for server in servers:
            out: dict = {}
            _post(server.url, {"input_ids": _prompt(31), "sampling_params": SAMPLING, **LOGPROBS}, out, "r")
            answers.append(top_logprobs(out["r"]))
        assert len(answers[0]) == SAMPLING["max_new_tokens"]
        assert same_logprobs(*answers)
    finally:
        stop_servers(servers)

    with pytest.raises(ServerStartError, match="DualPath serves one TP/PP rank per server"):
        start_servers([ServerSpec("null", 31820, "n0", extra_args=("--tp", "2"))], options, timeout_s=400)
