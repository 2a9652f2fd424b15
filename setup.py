"""For tools that look for setup.py: the package is defined in pyproject.toml, which this defers to."""
from setuptools import setup

setup()
