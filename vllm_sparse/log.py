"""The package logger. A child of vLLM's "vllm" logger, so messages share vLLM's format and level."""

import contextlib
import logging

logger = logging.getLogger("vllm.sparse")


@contextlib.contextmanager
def quiet():
    """The package's messages dropped for the block: work done again elsewhere, which says them there."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled
