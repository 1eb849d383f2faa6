"""Benchmarks against DALLE2-pytorch, outside the test suite: `python bench/run.py --help`."""
