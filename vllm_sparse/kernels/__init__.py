"""Attention over selected KV pages. reference.py is the exact torch version every kernel is tested against."""
