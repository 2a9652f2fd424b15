"""Configs shipped with the package (package data), found from the installed package, not the checkout."""
import os

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cpu.yaml")
