"""Benchmarks: the bench of methods on the embedded model, and micro-benchmarks."""
