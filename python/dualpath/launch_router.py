"""``python -m dualpath.launch_router --pd-disaggregation --prefill URL [PORT] --decode URL ...``

A drop-in for ``python -m sglang_router.launch_router`` in PD mode, with DualPath's options
(``--help`` lists them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dualpath.router import parse_args, run


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
