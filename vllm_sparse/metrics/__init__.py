"""Prometheus metrics of the sparse path: counted in the workers (`worker.py`), served on vLLM's
/metrics by the API server process (`collector.py`)."""
