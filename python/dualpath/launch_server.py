"""``python -m dualpath.launch_server``: ``python -m sglang.launch_server`` with DualPath flags.

The logic lives in ``dualpath.srt.launch``, with the rest of the SGLang-version-specific code.
"""

from dualpath.srt.launch import main

if __name__ == "__main__":
    main()
