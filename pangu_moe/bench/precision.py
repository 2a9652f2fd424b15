"""fp16 against fp32: the demo model (configs/demo_cpu.yaml) trained for the same steps from the same seed in
both precisions, one after the other in this process.

Reports each run's validation bits per byte, step time (tokens per step over the run's tokens/s, which
excludes the compiling first step), skipped steps, final loss scale and the bytes of parameters plus
optimizer state (`train.precision` keeps one fp32 copy of the weights, so these are equal). On CPU fp16
matmuls are not faster than fp32 (MindSpore 2.10), so the step-time ratio is reported, not targeted.
"""
import os
import shutil
import tempfile

from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.configs import DEMO_CONFIG

PRECISIONS = ("fp32", "fp16")


def _state_bytes(trainer):
    """Bytes of every model parameter and optimizer state tensor of `trainer`, each once (what a checkpoint holds)."""
    from pangu_moe.train.checkpoint import named_parameters
    params = named_parameters([trainer.model, trainer.optimizer]).values()
    return int(sum(p.asnumpy().nbytes for p in params))


def run(steps=None, config=DEMO_CONFIG, log=print):
    """Train once per precision; `steps` (default the config's) caps train.steps and the warmup with it.

    Returns {fp16_over_fp32_bpb, fp16_over_fp32_step_time, steps, and per precision: val_bpb, step_seconds,
    skipped_steps, loss_scale, param_and_state_bytes}.
    """
    from pangu_moe.train.metrics import read
    from pangu_moe.train.trainer import Trainer
    scratch = tempfile.mkdtemp(prefix="bench_precision_")
    runs = {}
    try:
        for precision in PRECISIONS:
            overrides = [f"train.precision={precision}"]
            if steps is not None:
                warmup = RunConfig.from_yaml(config).train.warmup_steps
                overrides += [f"train.steps={steps}", f"train.warmup_steps={min(warmup, steps)}"]
            cfg = RunConfig.from_yaml(config, overrides)
            run_dir = os.path.join(scratch, precision)
            log(f"bench precision: training {cfg.train.steps} steps in {precision}")
            trainer = Trainer(cfg, run_dir, log=lambda line: None)
            summary = trainer.train()
            records = read(os.path.join(run_dir, "metrics.jsonl"))
            if not summary["tokens_per_s"]:
                raise ConfigError(f"--steps = {cfg.train.steps}: too few to time a step (the first one compiles); "
                                  f"use at least 2")
            runs[precision] = {
                "val_bpb": summary["val_bpb"],
                "step_seconds": cfg.train.batch_size * cfg.model.seq_len / summary["tokens_per_s"],
                "skipped_steps": summary["skipped_steps"], "loss_scale": records[-1]["loss_scale"],
                "param_and_state_bytes": _state_bytes(trainer)}
            log(f"bench precision: {precision} val_bpb {summary['val_bpb']:.4f}, "
                f"{runs[precision]['step_seconds'] * 1e3:.0f} ms/step")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fp32, fp16 = runs["fp32"], runs["fp16"]
    return {"steps": cfg.train.steps, **runs,
            "fp16_over_fp32_bpb": fp16["val_bpb"] / fp32["val_bpb"],
            "fp16_over_fp32_step_time": fp16["step_seconds"] / fp32["step_seconds"],
            "skipped_steps": {p: runs[p]["skipped_steps"] for p in PRECISIONS},
            "param_and_state_bytes": {p: runs[p]["param_and_state_bytes"] for p in PRECISIONS}}


def table(result):
    """Human-readable lines for `run`'s result."""
    lines = [f"fp16 vs fp32, demo model, {result['steps']} steps, same seed",
             f"  {'precision':9s} {'val_bpb':>8s} {'ms/step':>8s} {'skipped':>8s} {'loss scale':>11s} "
             f"{'param+state MB':>15s}"]
    for p in PRECISIONS:
        r = result[p]
        lines.append(f"  {p:9s} {r['val_bpb']:8.4f} {r['step_seconds'] * 1e3:8.0f} {r['skipped_steps']:8d} "
                     f"{r['loss_scale']:11g} {r['param_and_state_bytes'] / 1e6:15.2f}")
    lines.append(f"  fp16_over_fp32_bpb = {result['fp16_over_fp32_bpb']:.4f}  (target <= 1.02)")
    lines.append(f"  fp16_over_fp32_step_time = {result['fp16_over_fp32_step_time']:.2f}  (reported; CPU fp16 "
                 f"matmuls are not faster)")
    return "\n".join(lines)
