"""Configs shipped with the package (package data), found from the installed package, not the checkout."""
import os

FOLDER = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(FOLDER, "demo_cpu.yaml")


def packaged_names():
    """The shipped configs' names without .yaml, sorted (e.g. ["demo_cpu", "smoke_cpu"])."""
    return sorted(name[:-len(".yaml")] for name in os.listdir(FOLDER) if name.endswith(".yaml"))


def packaged(path):
    """The shipped config a --config argument names when it is not a file: `demo_cpu`, `demo_cpu.yaml` or
    `configs/demo_cpu.yaml` or `./configs/demo_cpu.yaml` (the README's path, from any directory); None if it names
    none."""
    path = os.path.normpath(os.fspath(path))
    name = os.path.basename(path)
    name = name[:-len(".yaml")] if name.endswith(".yaml") else name
    parent = os.path.dirname(path)
    if parent not in ("", "configs") or name not in packaged_names():
        return None
    return os.path.join(FOLDER, name + ".yaml")
