"""Benchmarks: the HTTP API under concurrent streaming load against in-process baselines.

`make bench` (or `python -m bench --help`) runs it and prints a markdown table.
"""
