"""Benchmarks against DALLE2-pytorch (issue #9), outside the test suite: `python bench/run.py --help`."""
