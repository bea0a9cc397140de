"""Benchmarks: ``python -m benchmarks core --json OUT.json``."""
