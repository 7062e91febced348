"""vllm-sparse: sparse-attention prefill for vLLM, as the SPARSE attention backend."""

__version__ = "0.1.0"
