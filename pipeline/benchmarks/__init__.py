"""Benchmarks behind the `make bench-…` targets: each module runs as `python -m pipeline.benchmarks.<name>`.

Timing and memory targets are measured here, never in unit tests.
"""
