"""Benchmarks and experiment drivers (not imported by the library)."""
