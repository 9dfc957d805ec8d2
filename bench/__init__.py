"""Benchmarks (issue 5): `make bench` runs them all; see docs/performance.md."""
