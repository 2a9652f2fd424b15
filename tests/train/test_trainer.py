"""End-to-end training on a tiny model: learning, determinism, exact resume, outputs."""
import json
import math
import os
import shutil
import signal

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.config import ConfigError
from pangu_moe.train import checkpoint
from pangu_moe.train.checkpoint import list_checkpoints, remove
from pangu_moe.train.metrics import read
from pangu_moe.train.stop import TrainingStopped
from pangu_moe.train.trainer import Trainer, check_run_dir
from tests.conftest import tiny_config
from tests.train.test_metrics import read_events

SUMMARY_KEYS = {"steps", "val_loss", "val_bpb", "unigram_bpb", "bpb_over_unigram", "byte_unigram_bpb",
                "bpb_over_byte_unigram", "val_bpb_per_domain",
                "tokens_per_s", "router", "top_k", "num_experts", "num_groups", "dropped_fraction",
                "inter_node_fraction", "tokens_local", "tokens_intra", "tokens_inter", "max_over_mean_load",
                "dead_experts", "max_over_mean_load_per_layer", "dead_experts_per_layer", "capacity",
                "capacity_ratio", "capacity_mode", "params_total", "params_active", "skipped_steps", "rank_balance",
                "rank_balance_last", "modelled_exchange_s_per_step", "modelled_step_s",
                "compile_seconds", "wall_tokens_per_s"}
RECORD_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "locality_loss", "lr", "grad_norm", "tokens_per_s",
               "layers", "skipped_steps", "capacity_bucket", "reruns", "loss_scale", "modelled_exchange_ms",
               "compile_seconds", "compiled_steps"}
LAYER_KEYS = {"tokens_per_expert", "kept_per_expert", "tokens_per_rank_expert", "kept_per_rank", "dropped",
              "capacity", "tokens_local", "tokens_intra", "tokens_inter", "bytes_intra", "bytes_inter",
              "padded_bytes_intra", "padded_bytes_inter", "max_over_mean_load", "dead_experts"}


def _train(run_dir, *overrides, resume=False):
    return Trainer(tiny_config(*overrides), str(run_dir), log=lambda line: None).train(resume=resume)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    return run_dir, _train(run_dir)


def _losses(run_dir):
    return [(r["step"], r["loss"], r["lm_loss"], r["aux_loss"], r["grad_norm"]) for r in read(run_dir / "metrics.jsonl")]


def test_twenty_steps_lower_the_loss(run_a):
    run_dir, summary = run_a
    lm = [r["lm_loss"] for r in read(run_dir / "metrics.jsonl")]
    assert len(lm) == 20
    assert np.mean(lm[-5:]) < 0.85 * np.mean(lm[:5])
    assert summary["val_bpb"] < 0.9 * 8  # far below the uniform 8 bits per byte
    # one capacity bucket: its graph is built at the first step, which tokens_per_s leaves out and the wall figure not
    records = read(run_dir / "metrics.jsonl")
    assert [r["compiled_steps"] for r in records] == [1] + [0] * 19
    assert summary["compile_seconds"] == records[0]["compile_seconds"] > 0
    assert 0 < summary["wall_tokens_per_s"] < summary["tokens_per_s"]


def test_outputs_have_the_documented_fields(run_a):
    run_dir, summary = run_a
    assert SUMMARY_KEYS == set(summary)
    assert set(summary["val_bpb_per_domain"]) == {"prose", "code"}
    per_domain = summary["val_bpb_per_domain"]
    assert abs((per_domain["prose"] + per_domain["code"]) / 2 - summary["val_bpb"]) < 1e-9  # balanced windows
    assert summary["params_active"] < summary["params_total"]
    assert summary["byte_unigram_bpb"] == summary["unigram_bpb"]  # the byte tokenizer: tokens are bytes
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    records = read(run_dir / "metrics.jsonl")
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert {"val_loss", "val_bpb"} <= set(records[9]) and "val_loss" not in records[8]
    tokens = 4 * 32  # B * S, K = 1
    for r in records:
        assert len(r["layers"]) == 2
        for layer in r["layers"]:
            assert LAYER_KEYS <= set(layer)
            assert sum(layer["tokens_per_expert"]) == tokens
            assert sum(layer["kept_per_expert"]) + layer["dropped"] == tokens
            assert np.sum(layer["tokens_per_rank_expert"], 0).tolist() == layer["tokens_per_expert"]
            assert sum(layer["kept_per_rank"]) == sum(layer["kept_per_expert"])
            assert layer["tokens_local"] == sum(layer["kept_per_expert"]) and layer["tokens_inter"] == 0
            assert max(layer["kept_per_expert"]) <= layer["capacity"] == 40
    assert summary["capacity_ratio"] == 40 / 36  # ceil(1.25*128/4) / ceil(1.1*128/4)
    assert [s for s, _ in list_checkpoints(run_dir)] == [10, 20]


def test_training_writes_every_record_as_tensorboard_events(run_a):
    run_dir, _ = run_a
    events = read_events(run_dir / "tensorboard")
    records = read(run_dir / "metrics.jsonl")
    assert [step for step, _ in events["loss/lm_bits_per_token"]] == [r["step"] for r in records]
    assert [value for _, value in events["val/bits_per_byte"]] == pytest.approx(
        [r["val_bpb"] for r in records if "val_bpb" in r], rel=1e-6)  # events hold float32


def test_logged_lr_is_the_schedule_of_the_step_it_trained(run_a):
    """Record `step` s is written after the update of step s - 1 (0-based), which used the schedule's lr there."""
    run_dir, _ = run_a
    t = tiny_config().train
    records = read(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert t.lr == 0.003 and t.min_lr == 0.0003 and t.warmup_steps == 2 and t.steps == 20
    # warmup: lr x (s + 1) / 2 at steps 0 and 1; then cosine from lr at step 2 to min_lr at step 19 (docs: the
    # schedule's docstring); record 10 is step 10, 8 / 17 of the way
    assert [r["lr"] for r in records[:3]] == pytest.approx([0.0015, 0.003, 0.003])
    assert records[-1]["lr"] == pytest.approx(0.0003)
    assert records[10]["lr"] == pytest.approx(0.0003 + 0.0027 * (1 + math.cos(math.pi * 8 / 17)) / 2)


def test_same_seed_gives_identical_losses(run_a, tmp_path):
    run_dir, summary = run_a
    again = _train(tmp_path / "b")
    assert _losses(tmp_path / "b") == _losses(run_dir)
    assert again["val_loss"] == summary["val_loss"]


def test_resume_reproduces_an_uninterrupted_run(run_a, tmp_path):
    run_dir, summary = run_a
    resumed = tmp_path / "c"
    shutil.copytree(run_dir, resumed)
    remove(str(resumed / "checkpoints" / "step_000020"))  # as if killed after the step-10 checkpoint
    os.remove(resumed / "summary.json")
    again = _train(resumed, resume=True)
    assert _losses(resumed) == _losses(run_dir)
    assert again["val_loss"] == summary["val_loss"]
    assert again["dropped_fraction"] == summary["dropped_fraction"]


def test_async_safetensors_checkpoints_resume_exactly_and_corruption_is_detected(run_a, tmp_path, monkeypatch):
    """Format and background writing change no step: the losses are run_a's; a resume from the step-10
    safetensors checkpoint rewrites step 20 with the tensors the background write had saved."""
    run_dir, summary = run_a
    b = tmp_path / "b"
    threads = []

    class Counted(checkpoint.BackgroundWrite):
        def start(self):
            threads.append(self)
            super().start()
    monkeypatch.setattr(checkpoint, "BackgroundWrite", Counted)
    _train(b, "runtime.checkpoint_format=safetensors", "runtime.async_checkpoint=true")
    assert len(threads) == 2  # steps 10 and 20 were written by background threads
    assert _losses(b) == _losses(run_dir)
    step20 = checkpoint.step_path(str(b), 20)
    assert sorted(os.listdir(step20)) == ["experts_rank0.safetensors", "manifest.json", "shared.safetensors"]
    background = checkpoint.read_saved(step20)
    remove(step20)
    os.remove(b / "summary.json")
    again = _train(b, "runtime.checkpoint_format=safetensors", resume=True)  # a synchronous write this time
    assert _losses(b) == _losses(run_dir) and again["val_loss"] == summary["val_loss"]
    rewritten = checkpoint.read_saved(step20)
    for name, value in background.items():
        if name not in ("train_seconds", "train_tokens"):  # timed steps: a resumed run compiles again
            assert value.asnumpy().tobytes() == rewritten[name].asnumpy().tobytes(), name
    shard = os.path.join(step20, "experts_rank0.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0x01  # one bit of a weight
    open(shard, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="experts_rank0.safetensors does not match its sha256"):
        checkpoint.read_saved(step20, rank=0, world_size=1)  # a direct per-rank load checks its shard


def test_async_checkpoints_are_refused_on_multi_process_backends():
    with pytest.raises(ConfigError, match="runtime.async_checkpoint = True: must be false with "
                                          "parallel.dispatch=msrun_cpu"):
        tiny_config("runtime.async_checkpoint=true", "parallel.dispatch=msrun_cpu")


def test_a_sigterm_checkpoints_the_step_in_flight_and_resume_equals_an_uninterrupted_run(run_a, tmp_path):
    run_dir, summary = run_a
    stopped = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGTERM)

    def log(line):
        if line.split()[:2] == ["step", "13/20"]:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped) as stop:
        Trainer(tiny_config(), str(stopped), log=log).train()
    assert (stop.value.signum, stop.value.step, stop.value.exit_code) == (signal.SIGTERM, 13, 143)
    assert [s for s, _ in list_checkpoints(stopped)] == [10, 13] and not (stopped / "summary.json").exists()
    assert str(stop.value).endswith(f"resume with: pangu-moe train --config {stopped / 'config.yaml'} --out {stopped} "
                                    "--resume")
    assert signal.getsignal(signal.SIGTERM) is before
    again = _train(stopped, resume=True)
    assert _losses(stopped) == _losses(run_dir)
    assert again["val_loss"] == summary["val_loss"]


@pytest.mark.parametrize("noise", [("moe.topk.jitter_eps=0.2", "moe.slot_policy=random", "moe.top_k=2"),
                                   ("moe.router=kool_skip", "moe.slot_policy=random")])
def test_resume_with_training_noise_reproduces_an_uninterrupted_run(noise, tmp_path):
    """Jitter, random slots and sampled experts draw from buffers filled from (seed, step) each step."""
    overrides = (*noise, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=8", "parallel.nodes=2")
    _train(tmp_path / "a", *overrides)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    remove(str(tmp_path / "b" / "checkpoints" / "step_000008"))
    os.remove(tmp_path / "b" / "summary.json")
    _train(tmp_path / "b", *overrides, resume=True)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    names = [n for n, _ in checkpoint.read_saved(str(tmp_path / "a" / "checkpoints" / "step_000008")).items()]
    assert names and not any(".noise_" in n for n in names)  # one step's draw is not run state


@pytest.mark.parametrize("router", ["rre", "locmoe", "expert_choice", "sinkhorn", "deepseek", "base", "kool_skip"])
def test_other_routers_train(router, tmp_path):
    mode = "pynative" if router == "rre" else "graph"  # one router keeps PyNative covered
    extra = ["moe.slot_policy=random"] if router == "kool_skip" else []
    summary = _train(tmp_path / router, f"moe.router={router}", "train.steps=12", f"runtime.mode={mode}",
                     "train.eval_every=12", "train.checkpoint_every=12", *extra)
    lm = [r["lm_loss"] for r in read(tmp_path / router / "metrics.jsonl")]
    assert np.mean(lm[-3:]) < 0.9 * np.mean(lm[:3])
    assert summary["router"] == router and np.isfinite(summary["val_bpb"])
    locality = [r["locality_loss"] for r in read(tmp_path / router / "metrics.jsonl")]
    assert all(v > 0 for v in locality) if router == "locmoe" else all(v == 0 for v in locality)


def test_deepseek_bias_moves_in_graph_mode_and_dropless_drops_nothing(tmp_path):
    trainer = Trainer(tiny_config("moe.router=deepseek", "moe.slot_policy=none", "train.steps=6",
                                  "train.eval_every=6", "train.checkpoint_every=6"), str(tmp_path), log=lambda _: None)
    summary = trainer.train()
    bias = trainer.model.moe_blocks[0].moe.router.bias.asnumpy()
    steps = bias / 0.001  # gamma = 0.001: each step moves every entry by -1, 0 or +1 units
    assert np.abs(bias).max() > 0 and np.allclose(steps, np.round(steps), atol=1e-3) and np.abs(steps).max() <= 6
    assert summary["dropped_fraction"] == 0.0 and summary["capacity"] == 4 * 32


def test_resume_refuses_a_changed_trajectory(run_a):
    run_dir, _ = run_a
    with pytest.raises(ConfigError, match=r"--resume: train.lr = 0.004 differs from 0.003"):
        check_run_dir(tiny_config("train.lr=0.004", "train.steps=30"), str(run_dir), resume=True)
    with pytest.raises(ConfigError, match="the run already reached step 20"):
        check_run_dir(tiny_config(), str(run_dir), resume=True)
    assert check_run_dir(tiny_config("train.steps=30", "runtime.mode=pynative"), str(run_dir), resume=True) \
        .endswith("step_000020")
    # The run trained with auto, which is reference on CPU: naming it continues the run; custom does not.
    assert check_run_dir(tiny_config("train.steps=30", "runtime.kernels=reference"), str(run_dir), resume=True) \
        .endswith("step_000020")
    with pytest.raises(ConfigError, match=r"runtime.kernels = 'custom' differs from 'reference'.*--set "
                                          r"runtime.kernels=reference continues the run as it trained"):
        check_run_dir(tiny_config("train.steps=30", "runtime.kernels=custom"), str(run_dir), resume=True)


def test_pynative_mode_matches_graph_mode(run_a, tmp_path):
    run_dir, _ = run_a
    _train(tmp_path / "p", "runtime.mode=pynative", "train.steps=20")
    graph, pynative = _losses(run_dir)[:5], _losses(tmp_path / "p")[:5]
    np.testing.assert_allclose(np.array(pynative)[:, 1:], np.array(graph)[:, 1:], rtol=1e-4)


def test_locmoe_plus_live_capacity_and_node_accounting_survive_resume(tmp_path, monkeypatch):
    # Random features at this size need the ceiling (tests/routing/test_capacity_need.py), so the estimator
    # is replaced by one whose need falls with the step: this test is about the trainer's live capacity.
    from pangu_moe.routing import locmoe_plus
    def need(affinity, *args):  # 6..15 slots, a function of the batch, so a resumed run sees the same needs
        return {"need": 6 + int(np.abs(affinity).sum() * 1e3) % 10, "q_max": 0.5, "discriminative": 0.0}
    monkeypatch.setattr(locmoe_plus, "corollary6_need", need)
    overrides = ("moe.router=locmoe_plus", "moe.locmoe_plus.recompute_every=4",
                 "parallel.nodes=2", "train.steps=12", "train.eval_every=12", "train.checkpoint_every=8")
    summary = _train(tmp_path / "plus", *overrides)
    records = read(tmp_path / "plus" / "metrics.jsonl")
    capacities = np.array([[layer["capacity"] for layer in r["layers"]] for r in records])  # (steps, L)
    # Each of the 2 ranks routes its 64 tokens as one group: ceiling C = ceil(64 * 1.25 / 4) = 20.
    assert capacities.max() <= 20 and capacities[-1].max() < 20
    # Capacities change only at the re-estimates before steps 0, 4, 8 (records 1, 5, 9).
    assert all((capacities[i] == capacities[i - 1]).all() for i in range(1, len(records)) if i % 4)
    buckets = [r["capacity_bucket"] for r in records]  # the buffers follow the largest live capacity
    ladder = (8, 16, 20)  # C = 20: 20 / sqrt(2) and 20 / 2 round up to 16, then the floor 8
    assert buckets == [min(b for b in ladder if b >= c.max()) for c in capacities] and max(buckets) < 20
    for r in records:
        for layer in r["layers"]:
            assert max(layer["kept_per_expert"]) <= 2 * layer["capacity"]  # summed over the 2 rank groups
            assert layer["tokens_local"] + layer["tokens_intra"] + layer["tokens_inter"] == sum(layer["kept_per_expert"])
    assert sum(r["layers"][0]["tokens_inter"] for r in records) > 0  # 2 nodes, each hosting one group
    assert summary["capacity_ratio"] == pytest.approx(capacities.mean() / 18)  # ceil(64 * 1.1 / 4)
    inter = sum(layer["tokens_inter"] for r in records for layer in r["layers"])
    assert summary["inter_node_fraction"] == pytest.approx(inter / sum(sum(layer["kept_per_expert"])
                                                                       for r in records for layer in r["layers"]))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "plus", resumed)
    remove(str(resumed / "checkpoints" / "step_000012"))
    os.remove(resumed / "summary.json")
    again = _train(resumed, *overrides, resume=True)
    assert _losses(resumed) == _losses(tmp_path / "plus")
    assert again["capacity_ratio"] == summary["capacity_ratio"]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    # lr 1e30: step 1 applies a huge but finite update, after which every loss overflows
    with pytest.raises(FloatingPointError, match=r"steps 2\.\.4: 3 in a row with a non-finite loss or gradient"):
        _train(tmp_path, "train.lr=1e30", "train.warmup_steps=0", "train.max_skipped_steps=3",
               "train.checkpoint_every=1")
    records = read(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]  # steps 1..3 logged; step 4 aborted the run
    assert records[0]["loss"] is not None and records[1]["loss"] is None
    for _, path in list_checkpoints(tmp_path):  # steps 2 and 3 were skipped: their checkpoints equal step 1's
        saved = checkpoint.read_saved(path)
        assert all(np.isfinite(v.asnumpy()).all() for v in saved.values() if v.asnumpy().dtype.kind == "f")
    weights = [checkpoint.read_saved(path)["embedding"].asnumpy() for _, path in list_checkpoints(tmp_path)]
    assert all(np.array_equal(w, weights[-1]) for w in weights)


def test_dropless_buffers_follow_the_demand_and_drop_nothing(tmp_path):
    """slot_policy none: the buffers hold the largest demand of a (rank, expert), not T = 128 slots; a step
    whose demand outgrows them is rerun with larger ones, so nothing is dropped and training matches the run
    with T-slot buffers."""
    overrides = ("moe.slot_policy=none", "train.steps=6", "train.eval_every=6", "train.checkpoint_every=6")
    summary = _train(tmp_path / "sized", *overrides)
    records = read(tmp_path / "sized" / "metrics.jsonl")
    assert summary["dropped_fraction"] == 0.0 and all(layer["dropped"] == 0 for r in records for layer in r["layers"])
    demand = [max(max(layer["tokens_per_expert"]) for layer in r["layers"]) for r in records]
    buckets = [r["capacity_bucket"] for r in records]
    assert all(d <= b for d, b in zip(demand, buckets)) and max(buckets) < 128
    full = Trainer(tiny_config(*overrides), str(tmp_path / "full"), log=lambda line: None)
    full.expected_demand = None  # size the buffers by T
    full.train()
    assert [r["capacity_bucket"] for r in read(tmp_path / "full" / "metrics.jsonl")] == [128] * 6
    np.testing.assert_allclose(np.array(_losses(tmp_path / "sized"))[:, 1:], np.array(_losses(tmp_path / "full"))[:, 1:],
                               rtol=1e-5)


def test_each_step_compiles_for_the_bucket_of_its_largest_live_capacity(tmp_path, monkeypatch):
    """Static C = ceil(128 x 1.25 / 4) = 40, whose ladder is 8, 16, 24, 32, 40 (each 40 / sqrt(2)^k rounded up to a
    multiple of 8): the step is built for the smallest rung holding the largest layer's capacity, and only then."""
    from pangu_moe.train import trainer as trainer_module
    built, real = [], trainer_module.make_train_step

    def spy(model, optimizer, capacity, *args):
        built.append(capacity)
        return real(model, optimizer, capacity, *args)
    monkeypatch.setattr(trainer_module, "make_train_step", spy)
    trainer = Trainer(tiny_config("runtime.mode=pynative"), str(tmp_path), log=lambda line: None)
    assert trainer.capacity == 40
    input_ids, labels, domain_ids = next(trainer.batches(0))
    inputs = (Tensor(input_ids), Tensor(labels), Tensor(domain_ids), Tensor(1e-3, ms.float32))
    buckets = [trainer.run_step(capacities, inputs)[1] for capacities in ([6, 13], [3, 5], [33, 2], [17, 24],
                                                                            [13, 6])]
    assert buckets == [16, 8, 40, 24, 16] and built == [16, 8, 40, 24]  # a bucket is compiled once
