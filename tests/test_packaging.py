"""A non-editable install carries what it needs: from a folder outside the checkout it trains a shipped config
named by its name and builds the CPU kernels from the installed sources."""
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_installed_package_trains_a_shipped_config_and_builds_its_kernels_outside_the_checkout(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"
    # A copy, because the build writes build/ and *.egg-info into the tree it builds.
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", ".pytest_cache"))
    # --no-deps: the dependencies are this environment's; --no-build-isolation: nothing is downloaded.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True)
    package = site / "pangu_moe"
    for path in ("configs/smoke_cpu.yaml", "launch/run_ascend_cluster.sh", "kernels/cpu/moe_gating.cc",
                 "kernels/common/moe_kernel_common.h", "kernels/ascend/build.sh",
                 "kernels/ascend/moe_permute/op_kernel/moe_permute.cpp"):
        assert (package / path).is_file(), path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path / "home")}  # a fresh kernel cache

    def python(*args):
        done = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert python("-c", "import pangu_moe; print(pangu_moe.__file__)").strip() == str(package / "__init__.py")
    out = python("-m", "pangu_moe.cli", "train", "--config", "smoke_cpu", "--set", "train.steps=4",
                 "--set", "train.warmup_steps=2", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
                 "--out", "run")
    assert out == "summary: run/summary.json\n"
    assert json.loads((elsewhere / "run" / "summary.json").read_text())["steps"] == 4
    library = python("-c", "from pangu_moe.ops.build import library_path; print(library_path())").strip()
    assert library.startswith(str(tmp_path / "home")) and os.path.isfile(library)
