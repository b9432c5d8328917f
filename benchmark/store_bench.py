"""Store read throughput vs raw O_DIRECT, and emulated storage-NIC accuracy (same as `dualpath bench-store`)."""

from __future__ import annotations

import sys

from dualpath.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-store", *sys.argv[1:]]))
