"""Benchmark scripts (run each as ``python benchmarks/NAME.py --help``); they print figures and ratios."""
