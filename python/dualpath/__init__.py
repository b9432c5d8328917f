"""DualPath for SGLang: dual-path KV-cache loading for agentic prefill/decode serving."""

__version__ = "0.1.0"
