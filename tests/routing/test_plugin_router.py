"""Adding a router changes no other file: a toy router defined and registered in this module trains through
the CLI's config path (`moe.router: round_robin` in a YAML file)."""
import json

import mindspore as ms
import yaml
from mindspore import ops

from pangu_moe.cli import main
from pangu_moe.routing.base import Router, register, stack_losses
from tests.conftest import TINY


@register
class RoundRobinRouter(Router):
    """Token t of a routing group goes to expert t mod E_g of its group, with gate 1 and no losses."""

    name = "round_robin"
    max_top_k = 1
    loss_terms = ()

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        return cls(moe_cfg.num_experts, moe_cfg.num_groups, 1, moe_cfg.slot_policy)

    def score(self, x, token_ids, group_ids, training, rank=None):
        local_index = (ops.arange(x.shape[0], dtype=ms.int32) % self.experts_per_group).reshape(-1, 1)  # (T, 1)
        gate = ops.ones(local_index.shape, ms.float32)
        zero = ops.zeros((), ms.float32)
        return local_index, gate, gate, None, stack_losses(zero, zero, zero)


def test_a_router_registered_in_a_test_trains_one_step_through_the_cli(tmp_path):
    cfg = {**TINY, "moe": {**TINY["moe"], "router": "round_robin"},
           "train": {**TINY["train"], "steps": 1, "warmup_steps": 1, "eval_batches": 1},
           "runtime": {**TINY["runtime"], "mode": "pynative"}}
    path = tmp_path / "round_robin.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["router"] == "round_robin" and summary["steps"] == 1 and summary["dropped_fraction"] == 0.0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # 4 sequences of 32 tokens, domains 0, 1, 0, 1: each group's 64 tokens alternate over its 2 experts.
    assert [layer["tokens_per_expert"] for layer in record["layers"]] == [[32, 32, 32, 32]] * 2
    assert record["aux_loss"] == record["z_loss"] == record["locality_loss"] == 0.0
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "bad"), "--set", "moe.top_k=2"]) == 2
