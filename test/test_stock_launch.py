"""Stock ``python -m sglang.launch_server`` with the DualPath extra-config alone (its own module: it starts after
test_srt's servers have stopped, as SGLang refuses a HiCache host pool when the machine's memory is taken)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dualpath.kv import block_keys
from dualpath.scheduler.report import NodeReport
from dualpath.store import StoreIndex
from test_srt import SAMPLING, _prompt

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")


def test_stock_sglang_launcher_runs_dualpath_from_the_extra_config_with_metrics(tmp_path: Path) -> None:
    # No wrapper and no DualPath environment variable: `python -m sglang.launch_server` with the extra-config.
    from dualpath.cluster.servers import CPU_ARGS, TINY_MODEL, flush_cache, post_generate
    from dualpath.srt.config import BACKEND

    extra = json.dumps({**BACKEND, "node": "solo", "store_root": str(tmp_path / "store"), "prefetch_threshold": 64})
    port = 31500
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(TINY_MODEL), "--host", "127.0.0.1",
           "--port", str(port), "--max-total-tokens", "8192", *CPU_ARGS, "--page-size", "64", "--enable-metrics",
           "--enable-hierarchical-cache", "--hicache-mem-layout", "layer_first", "--hicache-storage-prefetch-policy",
           "wait_complete", "--disable-overlap-schedule", "--hicache-io-backend", "direct",
           "--hicache-storage-backend", "dynamic", "--hicache-storage-backend-extra-config", extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")} | {"OMP_NUM_THREADS": "1"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        report = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/dualpath/info", timeout=2) as response:
                    report = NodeReport.decode(response.read())
                if report.ready:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert report is not None and report.ready, log.read_text(errors="replace")[-3000:]
        assert (report.role, report.node, report.page_size) == ("null", "solo", 64)
        ids = _prompt(9)
        for _ in range(2):  # the second time the prefix is read back from the store
            out = post_generate(url, {"input_ids": ids, "sampling_params": SAMPLING}, timeout_s=120)
            assert len(out["output_ids"]) == SAMPLING["max_new_tokens"]
            deadline = time.monotonic() + 30
            while StoreIndex(tmp_path / "store").stored_prefix(block_keys(ids, 64)[:4], report.store_namespace) < 4:
                assert time.monotonic() < deadline, "the server did not write the prompt's blocks"
                time.sleep(0.2)
            flush_cache(url, 30)
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                metrics = response.read().decode()
            read = re.search(r'dualpath_blocks_read_total\{node="solo",role="null",side="pe"\} (\S+)', metrics)
            if (read and float(read.group(1)) >= 4) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert read and float(read.group(1)) >= 4, metrics[-2000:]
        assert "sglang:prefetch_pgs" in metrics  # SGLang's own storage metrics take DualPath's get_stats()
    finally:
        os.killpg(server.pid, 9)
        server.wait(30)
