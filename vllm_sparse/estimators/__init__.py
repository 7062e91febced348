"""Block-score estimators, one module each; importing this package registers them all."""

from vllm_sparse.estimators import antidiagonal, dense, lowbit, pooled, sink_local, vertical_slash  # noqa: F401
