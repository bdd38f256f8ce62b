"""Benchmarks for the SparCode engine: scripts apart from the tests."""
