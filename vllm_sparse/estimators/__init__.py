"""Block-score estimators, one module each; importing this package registers them all."""

from vllm_sparse.estimators import dense, sink_local  # noqa: F401
