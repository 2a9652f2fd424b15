"""Experiments: drivers that train or simulate several models and compare them (not imported by the library)."""
