"""Mixed precision: fp16 and the CPU bf16 form (bf16-rounded matmul operands), selective precision, dynamic loss
scaling."""
import ast
import os
import re
import shutil
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

import pangu_moe
from pangu_moe import generate, precision
from pangu_moe.config import ConfigError
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.pangu import build_model
from pangu_moe.routing.topk import TopKRouter
from pangu_moe.train import convert
from pangu_moe.train.checkpoint import remove
from pangu_moe.train.metrics import read
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

PACKAGE = Path(pangu_moe.__file__).parent
# Code that runs inside a compiled step; host-side numpy float64 (np.float64) is fine anywhere.
GRAPH_CODE = ["model", "routing", "dispatch", "ops", "train/steps.py", "train/optim.py", "experts.py",
              "activations.py", "precision.py"]


def _forward(cfg, ids, domains):
    ms.set_seed(7)
    model = build_model(cfg)
    return model(ids, domains, 40, False)


def _batch():
    rng = np.random.default_rng(0)
    return Tensor(rng.integers(0, 256, (4, 32)).astype(np.int32)), Tensor(np.zeros((4, 32), np.int32))


def test_fp16_forward_agrees_with_fp32_and_keeps_the_router_in_fp32(monkeypatch):
    seen = {"router_x": set(), "gate": set(), "expert_in": set()}
    score, experts = TopKRouter.score, GroupedExperts.construct

    def recording_score(self, x, *args, **kwargs):
        out = score(self, x, *args, **kwargs)
        seen["router_x"].add(x.dtype)
        seen["gate"].add(out[1].dtype)
        return out

    def recording_experts(self, expert_in):
        seen["expert_in"].add(expert_in.dtype)
        return experts(self, expert_in)

    monkeypatch.setattr(TopKRouter, "score", recording_score)
    monkeypatch.setattr(GroupedExperts, "construct", recording_experts)
    ids, domains = _batch()
    full = _forward(tiny_config(), ids, domains)
    assert seen == {"router_x": {ms.float32}, "gate": {ms.float32}, "expert_in": {ms.float32}}
    for key in seen:
        seen[key].clear()
    half = _forward(tiny_config("train.precision=fp16"), ids, domains)
    assert seen == {"router_x": {ms.float32}, "gate": {ms.float32}, "expert_in": {ms.float16}}
    logits, logits16 = full[0].asnumpy(), half[0].asnumpy()
    assert logits16.dtype == np.float32  # the LM loss reads fp32 logits
    # Measured: max |difference| 3.5e-4 with max |logit| 0.66 (fp16 keeps 11 bits, 4.9e-4 relative).
    assert np.abs(logits - logits16).max() <= 2e-3 * np.abs(logits).max()
    assert np.abs(logits - logits16).max() > 0  # the matmuls did run in fp16
    for key in seen:
        seen[key].clear()
    _forward(tiny_config("train.precision=fp16", "moe.router_dtype=low"), ids, domains)
    assert seen == {"router_x": {ms.float16}, "gate": {ms.float32}, "expert_in": {ms.float16}}


def _trainer(run_dir, *overrides):
    return Trainer(tiny_config(*overrides), str(run_dir), log=lambda line: None)


def _state(trainer):
    """Every model parameter (weights and router state) and optimizer state but the loss scaler's, as numpy."""
    cells = (trainer.model, trainer.optimizer)
    return {p.name: p.asnumpy().copy() for cell in cells for p in cell.get_parameters() if "loss_scale" not in p.name}


def test_overflowing_fp16_steps_apply_nothing_and_back_the_scale_off(tmp_path):
    # Scale 2^64: every fp16 gradient overflows. The limit of 2 skips in a row would stop the run if these
    # counted; while the scale can still back off they do not.
    trainer = _trainer(tmp_path, "train.precision=fp16", "train.loss_scale=18446744073709551616", "train.steps=4",
                       "train.max_skipped_steps=2", "train.eval_every=4", "train.checkpoint_every=4",
                       "moe.router=deepseek")
    before = _state(trainer)
    trainer.train()
    records = read(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [1, 2, 3, 4]
    assert [r["loss_scale"] for r in records] == [2.0 ** 63, 2.0 ** 62, 2.0 ** 61, 2.0 ** 60]
    assert all(np.isfinite(r["loss"]) for r in records)
    after = _state(trainer)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)  # incl. the DeepSeek bias, Adam, step


def test_the_fp16_scale_doubles_after_a_window_of_applied_steps(tmp_path):
    _trainer(tmp_path, "train.precision=fp16", "train.loss_scale=16", "train.loss_scale_window=2", "train.steps=4",
             "train.eval_every=4", "train.checkpoint_every=4").train()
    records = read(tmp_path / "metrics.jsonl")
    assert [r["loss_scale"] for r in records] == [16.0, 32.0, 32.0, 64.0]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_keep_a_static_scale_of_one(tmp_path, precision):
    trainer = _trainer(tmp_path, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                       f"train.precision={precision}")
    trainer.train()
    assert [r["loss_scale"] for r in read(tmp_path / "metrics.jsonl")] == [1.0, 1.0]
    assert not trainer.optimizer.loss_scaler.dynamic


def _bf16(a):
    """Round float32 values to the nearest bf16 (ties to even), by their bits: an oracle independent of MindSpore."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def test_bf16_on_cpu_rounds_every_matmul_operand_and_accumulates_in_fp32():
    assert _bf16([1 + 2 ** -8, 1 + 3 * 2 ** -8]).tolist() == [1.0, 1 + 2 ** -6]  # ties to even
    assert precision.compute_form("bf16", "CPU") == (ms.float32, True)
    assert precision.compute_form("bf16", "Ascend") == (ms.bfloat16, False)
    from pangu_moe.activations import fast_gelu
    from pangu_moe.model.mlp import DenseMLP
    ms.set_seed(3)
    mlp = DenseMLP(16, 32, 0.5)
    mlp.compute_dtype, mlp.bf16_operands = precision.compute_form("bf16", "CPU")
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    w_in, w_out = mlp.w_in.asnumpy(), mlp.w_out.asnumpy()
    hidden = fast_gelu(Tensor(_bf16(x) @ _bf16(w_in))).asnumpy()
    want = _bf16(hidden) @ _bf16(w_out)
    got = mlp(Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    exact = (fast_gelu(Tensor(x @ w_in)).asnumpy() @ w_out)
    assert np.abs(got - exact).max() > 100 * np.abs(got - want).max()  # the rounding is there, and it is bf16's


def test_bf16_forward_on_cpu_rounds_the_experts_and_keeps_the_router_exact(monkeypatch):
    seen = []
    experts = GroupedExperts.construct
    monkeypatch.setattr(GroupedExperts, "construct", lambda self, x: seen.append(x.asnumpy()) or experts(self, x))
    ids, domains = _batch()
    full = _forward(tiny_config(), ids, domains)[0].asnumpy()
    fp32_in = seen.pop()
    bf16 = _forward(tiny_config("train.precision=bf16"), ids, domains)[0].asnumpy()
    bf16_in = seen.pop()
    assert bf16_in.dtype == np.float32 and np.array_equal(bf16_in, _bf16(bf16_in))  # the buffers hold bf16 values
    # the experts round their weights and hidden activations too: one layer against the numpy oracle
    from pangu_moe.activations import fast_gelu
    ms.set_seed(7)
    layer_experts = build_model(tiny_config("train.precision=bf16")).moe_blocks[0].moe.experts
    w_in, w_out = layer_experts.w_in.asnumpy(), layer_experts.w_out.asnumpy()
    hidden = fast_gelu(Tensor(np.matmul(bf16_in, _bf16(w_in)))).asnumpy()  # (E, C, F)
    got = experts(layer_experts, Tensor(bf16_in)).asnumpy()  # the unpatched construct
    np.testing.assert_allclose(got, np.matmul(_bf16(hidden), _bf16(w_out)), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fp32_in, _bf16(fp32_in))
    # bf16 keeps 8 bits (3.9e-3 relative); fp16's 11 bits gave 3.5e-4 on the same batch
    assert 0 < np.abs(full - bf16).max() <= 2e-2 * np.abs(full).max()


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["loss_scale"]) for r in read(run_dir / "metrics.jsonl")]


def test_fp16_resume_on_simulated_ranks_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    overrides = ("train.precision=fp16", "train.loss_scale=1024", "train.loss_scale_window=3",
                 "parallel.dispatch=simulated", "parallel.devices_per_node=2", "train.steps=8", "train.eval_every=8",
                 "train.checkpoint_every=4")
    from pangu_moe.train import trainer as trainer_module
    widths, record = [], trainer_module.layer_record

    def spy(*args):  # the exchange carries fp16: its bytes are counted at 2 a value (the count: test_traffic.py)
        widths.append(args[5])
        return record(*args)
    monkeypatch.setattr(trainer_module, "layer_record", spy)
    summary = _trainer(tmp_path / "a", *overrides).train()
    records = read(tmp_path / "a" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["loss_scale"] for r in records] == [1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 4096.0, 4096.0, 4096.0]
    assert set(widths) == {2} and len(widths) == 8 * 2 and all(layer["bytes_intra"] > 0 for layer in
                                                             records[-1]["layers"])
    resumed = tmp_path / "b"
    shutil.copytree(tmp_path / "a", resumed)
    remove(str(resumed / "checkpoints" / "step_000008"))  # as if killed after the step-4 checkpoint
    os.remove(resumed / "summary.json")
    again = _trainer(resumed, *overrides).train(resume=True)
    assert _losses(resumed) == _losses(tmp_path / "a")
    assert again["val_bpb"] == summary["val_bpb"]
    # The checkpoint serves the other paths in fp16: reshard to 2 expert shards, then generate from it.
    resharded = convert.reshard(str(tmp_path / "a" / "checkpoints" / "step_000008"), str(tmp_path / "ep2"), ep=2)
    cfg, model, tok = generate.load_model(resharded)
    assert cfg.train.precision == "fp16" and model.compute_dtype == ms.float16
    text, trace = generate.generate(cfg, model, tok, "def f(x):", "code", 8, 1.0, 0, seed=3)
    assert (text, trace) == generate.generate(cfg, model, tok, "def f(x):", "code", 8, 1.0, 0, seed=3)
    assert len(text) == 8 and all(0 <= b < 256 for b in text)


@pytest.mark.parametrize("overrides, message", [
    (("moe.router_dtype=low",), r"moe.router_dtype = 'low': must be fp32 with train.precision=fp32"),
    (("train.precision=fp16", "train.loss_scale=1000"), r"train.loss_scale = 1000.0: must be a power of 2"),
    (("train.loss_scale_backoff=0.3",), r"train.loss_scale_backoff = 0.3: must be a power of 2 below 1"),
    (("train.precision=fp8",), r"train.precision = 'fp8'"),
])
def test_bad_precision_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        tiny_config(*overrides)
    assert "\n" not in str(error.value)


def test_the_kl_dtype_is_fp32_on_ascend(monkeypatch):
    assert precision.kl_dtype() == ms.float64  # the tests run on CPU
    monkeypatch.setattr(precision.ms, "get_context", lambda key: "Ascend")
    assert precision.kl_dtype() == ms.float32


def _mindspore_float64(path):
    """Lines of `path` naming MindSpore's float64 (not numpy's), outside `precision.kl_dtype`."""
    tree = ast.parse(path.read_text())
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "kl_dtype":
            allowed |= set(range(node.lineno, node.end_lineno + 1))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "float64" and node.lineno not in allowed
            and not (isinstance(node.value, ast.Name) and node.value.id == "np")]


def test_no_float64_in_compiled_code_or_the_cpu_kernels_but_the_kl_dtype():
    """The package's graph code names MindSpore's float64 only in `precision.kl_dtype`, and the C++ CPU kernels
    (the CPU twins of the float32 Ascend kernels) hold no double."""
    files = [f for part in GRAPH_CODE for f in ([PACKAGE / part] if part.endswith(".py")
                                                else sorted((PACKAGE / part).rglob("*.py")))]
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): lines for f in files if (lines := _mindspore_float64(f))}
    kernels = sorted(f for part in ("cpu", "common") for f in (PACKAGE / "kernels" / part).glob("*.[ch]*"))
    assert len(kernels) >= 5
    found.update({f.name: [n for n, line in enumerate(f.read_text().splitlines(), 1)
                           if re.search(r"\bdouble\b|_pd\b|__m128d", line.split("//")[0])] for f in kernels})
    assert {name: lines for name, lines in found.items() if lines} == {}
