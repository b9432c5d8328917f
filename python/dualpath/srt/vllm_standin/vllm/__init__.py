"""Stand-in for the one vLLM op SGLang's non-CUDA rotary path imports (see dualpath.srt.cpu)."""
