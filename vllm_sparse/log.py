"""The package logger. A child of vLLM's "vllm" logger, so messages share vLLM's format and level."""

import logging

logger = logging.getLogger("vllm.sparse")
