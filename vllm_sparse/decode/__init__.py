"""Sparse decode: Quest page summaries, block selection per KV head and attention over the selected
blocks, for decode steps over long contexts (summaries -> select -> attention, run by `step`)."""
