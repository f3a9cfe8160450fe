"""Benchmarks: each runs as ``python -m benchmarks.NAME [--quick]``, prints a table and writes
``benchmarks/results/NAME.json`` with the environment needed to reproduce it."""
