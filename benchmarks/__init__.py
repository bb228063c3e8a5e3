"""Benchmark scripts; results and how to read them are in BENCHMARKS.md."""
