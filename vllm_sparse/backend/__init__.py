"""The SPARSE attention backend: vLLM's dense backend for the platform, plus a sparse prefill path."""
