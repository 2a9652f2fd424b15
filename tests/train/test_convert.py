"""`pangu-moe ckpt reshard` and `ckpt extract-domain` on a tiny trained run."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe import cli
from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.train import checkpoint, convert
from pangu_moe.train.restore import restore, run_config
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config


def same_tensors(a, b, skip=()):
    """True if two checkpoints (folders or files) hold the same tensors bit for bit (experts joined), but for those
    whose names end with one of `skip`."""
    (shared_a, experts_a), (shared_b, experts_b) = convert.read_all(a), convert.read_all(b)
    return all(x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                            and x[k].tobytes() == y[k].tobytes() for k in x if not k.endswith(skip))
               for x, y in ((shared_a, shared_b), (experts_a, experts_b)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2 x 2 run (4 ranks, 4 experts in 2 groups) trained 4 steps on the simulated backend."""
    run_dir = tmp_path_factory.mktemp("convert") / "run"
    cfg = tiny_config("train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "parallel.nodes=2",
                      "parallel.devices_per_node=2", "parallel.dispatch=simulated")
    Trainer(cfg, str(run_dir), log=lambda line: None).train()
    return run_dir, checkpoint.step_path(str(run_dir), 4)


def test_reshard_round_trips_reproduce_every_tensor_bitwise(tiny_run, tmp_path):
    _, source = tiny_run
    four = convert.reshard(source, str(tmp_path / "ep4"), 4)
    manifest = checkpoint.verify(four)
    assert [s["experts"] for s in manifest["shards"]] == [[0], [1], [2], [3]]
    two = convert.reshard(four, str(tmp_path / "ep2"), 2)
    assert [s["experts"] for s in checkpoint.verify(two)["shards"]] == [[0, 1], [2, 3]]
    back = convert.reshard(two, str(tmp_path / "ep4_again"), 4)
    one = convert.reshard(four, str(tmp_path / "one"), consolidate=True)
    assert one.endswith("model.ckpt") and os.path.isfile(one)
    again = convert.reshard(one, str(tmp_path / "from_one"), 4)
    for path in (four, two, back, one, again):
        assert same_tensors(source, path), path
    cfg = RunConfig.from_yaml(str(tmp_path / "ep2" / "config.yaml"))
    assert (cfg.parallel.nodes, cfg.parallel.devices_per_node) == (2, 1)
    # every layout loads into the run's model and gives its state back
    model_cfg = run_config(str(two))
    assert restore(str(two), model_cfg)[2]["step"] == 4 and restore(one, run_config(one))[2]["step"] == 4


def test_safetensors_reshard_round_trips_bitwise(tiny_run, tmp_path):
    """A run whose config says safetensors reshards into safetensors files, read back bit for bit."""
    import shutil
    run_dir, source = tiny_run
    shutil.copytree(run_dir, tmp_path / "run")
    cfg = RunConfig.from_yaml(str(tmp_path / "run" / "config.yaml"), ["runtime.checkpoint_format=safetensors"])
    cfg.save(str(tmp_path / "run" / "config.yaml"))
    two = convert.reshard(checkpoint.step_path(str(tmp_path / "run"), 4), str(tmp_path / "ep2"), 2)
    assert sorted(os.listdir(two)) == ["experts_rank0.safetensors", "experts_rank1.safetensors", "manifest.json",
                                       "shared.safetensors"]
    four = convert.reshard(two, str(tmp_path / "ep4"), 4)
    one = convert.reshard(four, str(tmp_path / "one"), consolidate=True)
    assert one.endswith("model.safetensors")
    for path in (two, four, one):
        assert same_tensors(source, path), path
    assert restore(str(four), run_config(str(four)))[2]["step"] == 4


def test_reshard_refuses_what_it_cannot_do(tiny_run, tmp_path, capsys):
    _, source = tiny_run
    with pytest.raises(ConfigError, match="--ep 3: must divide moe.num_experts = 4"):
        convert.reshard(source, str(tmp_path / "x"), 3)
    convert.reshard(source, str(tmp_path / "y"), 2)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        convert.reshard(source, str(tmp_path / "y"), 2)
    assert cli.main(["ckpt", "reshard", source, "--out", str(tmp_path / "z")]) == 2
    assert "pass either --ep W2" in capsys.readouterr().err
    manifest_path = os.path.join(str(tmp_path / "y"), "checkpoints", "step_000004", "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["shards"][1]["experts"] = [0, 1]  # expert 0 twice, 2 and 3 missing
    open(manifest_path, "w").write(json.dumps(manifest))
    assert cli.main(["ckpt", "reshard", os.path.dirname(manifest_path), "--ep", "4", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every expert must appear exactly once (duplicated [0, 1])" in err


def test_extracted_domain_gives_bitwise_identical_logits_and_runs_alone(tiny_run, tmp_path, capsys):
    _, source = tiny_run
    cfg = run_config(source)
    full, _, _ = restore(source, cfg)
    assert cli.main(["ckpt", "extract-domain", source, "--domain", "code", "--out", str(tmp_path / "code")]) == 0
    sub_path = checkpoint.step_path(str(tmp_path / "code"), 4)
    sub_cfg = run_config(sub_path)
    assert (sub_cfg.moe.num_experts, sub_cfg.moe.num_groups) == (2, 1)
    sub, _, state = restore(sub_path, sub_cfg)
    assert state["step"] == 4
    rng = np.random.default_rng(0)
    tokens = Tensor(rng.integers(0, 256, (4, 32)).astype(np.int32))
    code = Tensor(np.ones((4, 32), np.int32))  # domain 1 = code
    capacity = 10
    full_logits = full(tokens, code, capacity)[0].asnumpy()
    sub_logits = sub(tokens, Tensor(np.zeros((4, 32), np.int32)), capacity)[0].asnumpy()
    assert full_logits.tobytes() == sub_logits.tobytes()
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", sub_path]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    with pytest.raises(ConfigError, match="--domain 'poetry': must be one of prose, code"):
        convert.extract_domain_run(source, "poetry", str(tmp_path / "p"))
