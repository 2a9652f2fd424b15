"""`pangu-moe bench train-step`: how much of the CPU's matmul throughput the demo's training step uses.

Trains the demo config (configs/demo_cpu.yaml) for a few steps and takes the time of its compiled steps
(the trainer's tokens/s, which excludes the steps that compiled), then times, in the same process, a float32
matmul of the step's most common shape ([B·S, H] x [H, F], MindSpore's CPU kernel, the best of `repeats`).

- `model_gflops_per_step`: counted from the shapes (`model_flops`), forward and backward (3 x forward):
  attention projections and score/value products (all S x S scores: the causal half is computed too), the
  dense FFNs and the query layer's, the routers' linear maps, the routed expert FFNs at the tokens' K
  choices (the capacity's padding slots are not useful work and not counted), and the tied LM head.
- `step_gflop_per_s` = model_gflops_per_step / step seconds; `sgemm_gflop_per_s` the matmul's;
  `cpu_utilisation` = their ratio (the issue's target is >= 0.6).
- `op_type_share`: where a step's time goes, from a second, profiled run of `PROFILED_STEPS` steps
  (`runtime.profile_steps`; the profiler slows the steps it records, so the first run is timed unprofiled):
  the ten op types that took most time, each with its share.
"""
import os
import shutil
import tempfile
import time

from pangu_moe import runtime
from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.configs import DEMO_CONFIG

BACKWARD_FACTOR = 3  # forward + backward: the backward of a matmul is two matmuls of its size
PROFILED_STEPS = (3, 8)  # the profiled run: steps 3..7, after the compiling first step and a few more


def model_flops(cfg):
    """Forward FLOPs of one training step of `cfg` (the global batch), by part: {attention_projections,
    attention_scores, dense_ffn, routers, experts, lm_head} (multiply-adds count 2)."""
    m, moe, t = cfg.model, cfg.moe, cfg.train
    tokens = t.batch_size * m.seq_len
    attention_layers = m.num_dense_layers + m.num_moe_layers + 1  # + the query layer
    experts = moe.num_experts if moe.num_experts > 1 else 0  # num_experts = 1: the study's dense arm
    return {
        "attention_projections": attention_layers * 2 * tokens * m.hidden * 4 * m.hidden,  # q, k, v, o
        "attention_scores": attention_layers * 2 * 2 * t.batch_size * m.seq_len * m.seq_len * m.hidden,  # QK^T, AV
        "dense_ffn": (m.num_dense_layers + 1) * 2 * 2 * tokens * m.hidden * m.ffn_hidden,
        "routers": m.num_moe_layers * 2 * tokens * m.hidden * experts,
        "experts": m.num_moe_layers * 2 * 2 * tokens * moe.top_k * m.hidden * moe.expert_hidden,
        "lm_head": 2 * tokens * m.hidden * m.vocab_size,
    }


def sgemm_seconds(rows, inner, cols, repeats):
    """Best wall time of a float32 [rows, inner] x [inner, cols] matmul (MindSpore, compiled) over `repeats`."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, ops
    a = Tensor(np.random.default_rng(0).standard_normal((rows, inner)).astype(np.float32))
    b = Tensor(np.random.default_rng(1).standard_normal((inner, cols)).astype(np.float32))

    @ms.jit
    def matmul(x, y):
        return ops.matmul(x, y)
    matmul(a, b).asnumpy()  # compile
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        matmul(a, b).asnumpy()
        best = min(best, time.perf_counter() - began)
    return best


def _short_run(config, steps, extra=()):
    """The RunConfig of `config` cut to `steps` steps with one evaluation batch at the end."""
    return RunConfig.from_yaml(config, [f"train.steps={steps}", f"train.warmup_steps={min(steps, 30)}",
                                        f"train.eval_every={steps}", "train.eval_batches=1",
                                        f"train.checkpoint_every={steps}", f"train.log_every={steps}", *extra])


def run(steps=30, repeats=50, config=DEMO_CONFIG, log=print, profile=True):
    """Returns {model_gflops_per_step, gflops_by_part, step_seconds, step_gflop_per_s, sgemm_shape,
    sgemm_gflop_per_s, cpu_utilisation, steps, op_type_share ({op type: share}, only with `profile`)}."""
    from pangu_moe.train.profile import PROFILE_DIR, op_type_times
    from pangu_moe.train.trainer import Trainer
    cfg = _short_run(config, steps)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    shape = (tokens, cfg.model.hidden, cfg.model.ffn_hidden)
    log(f"bench train-step: timing a float32 matmul {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}")
    # Before any training: a profiler's parsing processes, or the trainer's threads, can slow a later timing. The
    # device is set first, as the trainer would: MindSpore refuses to set it once a kernel has run.
    runtime.setup(cfg.runtime)
    sgemm = 2 * shape[0] * shape[1] * shape[2] / sgemm_seconds(*shape, repeats) / 1e9
    scratch = tempfile.mkdtemp(prefix="bench_train_step_")
    shares = {}
    try:
        log(f"bench train-step: training the demo model {steps} steps")
        summary = Trainer(cfg, os.path.join(scratch, "run"), log=lambda line: None).train()
        if profile:
            log(f"bench train-step: profiling steps {PROFILED_STEPS[0]}..{PROFILED_STEPS[1] - 1} of a second run")
            profiled = _short_run(config, PROFILED_STEPS[1], [f"runtime.profile_steps=[{PROFILED_STEPS[0]}, "
                                                              f"{PROFILED_STEPS[1]}]"])
            Trainer(profiled, os.path.join(scratch, "profiled"), log=lambda line: None).train()
            times = op_type_times(os.path.join(scratch, "profiled", PROFILE_DIR))
            shares = {op: share for op, _, share in times[:10]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not summary["tokens_per_s"]:
        raise ConfigError(f"--steps = {steps}: every step compiled a graph, none was timed; use more steps")
    step_seconds = tokens / summary["tokens_per_s"]
    parts = {name: BACKWARD_FACTOR * flops / 1e9 for name, flops in model_flops(cfg).items()}
    gflops = sum(parts.values())
    step_rate = gflops / step_seconds
    return {"steps": steps, "model_gflops_per_step": gflops, "gflops_by_part": parts, "step_seconds": step_seconds,
            "step_gflop_per_s": step_rate, "sgemm_shape": list(shape), "sgemm_gflop_per_s": sgemm,
            "cpu_utilisation": step_rate / sgemm, **({"op_type_share": shares} if profile else {})}


def table(result):
    """Human-readable lines for `run`'s result."""
    parts = ", ".join(f"{name} {value:.2f}" for name, value in result["gflops_by_part"].items())
    m, k, n = result["sgemm_shape"]
    return "\n".join([
        f"demo training step ({result['steps']} steps, compiled steps only): {result['step_seconds'] * 1e3:.0f} ms",
        f"  model GFLOP a step (forward + backward) {result['model_gflops_per_step']:.2f}: {parts}",
        f"  step {result['step_gflop_per_s']:.1f} GFLOP/s; float32 matmul {m}x{k} @ {k}x{n} "
        f"{result['sgemm_gflop_per_s']:.1f} GFLOP/s",
        f"  cpu_utilisation = {result['cpu_utilisation']:.2f}  (target >= 0.6)"] +
        (["  time by op type (profiled run): " + ", ".join(f"{op} {share:.0%}" for op, share in
                                                           result["op_type_share"].items())]
         if result.get("op_type_share") else []))
