"""Benchmarks: each prints JSON and compares ratios measured in one run."""
