"""Benchmarks and experiment drivers (not imported by the library)."""
import os

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                           "demo_cpu.yaml")  # the checkout's demo config, the default base of benchmarks and studies
