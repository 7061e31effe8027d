"""Benchmarks behind `flexserve bench` and `flexserve ppl`."""
