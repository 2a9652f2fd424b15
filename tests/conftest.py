"""Shared test setup: run from a scratch directory (MindSpore writes rank_*/ and *_meta/ into the
working directory) and build tiny configs."""
import os

import mindspore as ms
import pytest

from pangu_moe.checks import check
from pangu_moe.config import RunConfig

ms.set_device("CPU")
ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


TINY = {
    "model": {"hidden": 32, "num_heads": 2, "num_dense_layers": 1, "num_moe_layers": 2, "ffn_hidden": 64,
              "seq_len": 32},
    "moe": {"num_experts": 4, "expert_hidden": 64, "num_groups": 2, "top_k": 1, "capacity_factor": 1.25},
    "train": {"steps": 20, "batch_size": 4, "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 2, "log_every": 1,
              "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10},
    "data": {"source": "demo", "max_bytes_per_domain": 40000},
    "runtime": {"mode": "graph", "seed": 7},
}


def tiny_config(*overrides):
    """A tiny RunConfig (H=32, E=4 in 2 groups, S=32, B=4) with "section.key=value" overrides, checked as a run's
    config is (its fields, then the routers' and kernels' rules: pangu_moe/checks.py)."""
    return check(RunConfig.from_dict(TINY, overrides))


@pytest.fixture
def tiny_yaml(tmp_path):
    """`TINY` as a YAML file, for commands that take a config path."""
    import yaml
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)
