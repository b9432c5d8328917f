"""``python -m dualpath.launch_router --pd-disaggregation --prefill URL [PORT|none] --decode URL ...``

A drop-in for ``python -m sglang_router.launch_router`` in PD mode: its own flags (sglang-router's parser),
with DualPath's options on top (``--help`` lists them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dualpath.router import parse_args, run


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    level = {"warn": logging.WARNING}.get(config.log_level, config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
