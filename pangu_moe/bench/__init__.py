"""Timing benchmarks that print figures (not imported by the library)."""
