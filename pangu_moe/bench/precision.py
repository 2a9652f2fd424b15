"""fp16 and bf16 against fp32: the demo model (configs/demo_cpu.yaml) trained for the same steps in each precision,
over paired seeds (seed i of every arm starts from the same weights and sees the same data), one run after another,
each in a fresh process: twelve trainings in one process held 18.9 GB of compiled graphs when it was stopped
(2026-12-07), on a 24 GB machine.

Arms: `fp32`; `fp16` (dynamic loss scale with a growth window of `FP16_WINDOW` steps, short enough that the scale
both backs off and grows within a demo run); `bf16` (on CPU the measuring form of `precision.compute_form`:
bf16-rounded matmul operands, fp32 accumulation; no loss scaling); `fp16_router_low` (fp16 with the router's
input and logits in fp16 too, `moe.router_dtype=low`: Switch's contrast for "keep the router in fp32").

Reports per arm and seed: validation bits per byte, step time (tokens per step over the run's tokens/s, which
excludes the compiling first step), skipped steps, the loss scale's backoffs and growths (from every step's
record) and its final value, the bytes of parameters plus optimizer state (one fp32 copy of the weights in every
precision, so these are equal); and, over the seeds, `<arm>_over_fp32_bpb` as {mean, ci95, n} of the per-seed
ratios. Target (docs/results): the upper end of the fp16 and bf16 intervals within 1.02. Step-time ratios are
reported, not targeted: on CPU fp16 matmuls are slower than fp32 and the bf16 form adds two casts per operand.
"""
import os
import shutil
import tempfile

from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.configs import DEMO_CONFIG

ARMS = {"fp32": [], "fp16": ["train.precision=fp16"], "bf16": ["train.precision=bf16"],
        "fp16_router_low": ["train.precision=fp16", "moe.router_dtype=low"]}
SEEDS = 3
FP16_WINDOW = 25  # applied steps without an overflow before the fp16 loss scale doubles


def _state_bytes(trainer):
    """Bytes of every model parameter and optimizer state tensor of `trainer`, each once (what a checkpoint holds)."""
    from pangu_moe.train.checkpoint import named_parameters
    params = named_parameters([trainer.model, trainer.optimizer]).values()
    return int(sum(p.asnumpy().nbytes for p in params))


def scale_moves(initial, scales):
    """(backoffs, growths) of a loss scale that starts at `initial` and is `scales` after each step, in order."""
    before = [initial] + list(scales[:-1])
    return sum(b > a for a, b in zip(scales, before)), sum(b < a for a, b in zip(scales, before))


def _config(config, arm, seed, steps):
    """The RunConfig of one run: the arm's overrides, seed `seed`, every step logged."""
    base = RunConfig.from_yaml(config)
    overrides = [*ARMS[arm], f"runtime.seed={base.runtime.seed + seed}", "train.log_every=1"]
    if arm.startswith("fp16"):
        overrides.append(f"train.loss_scale_window={FP16_WINDOW}")
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={min(base.train.warmup_steps, steps)}",
                      f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    return RunConfig.from_yaml(config, overrides)


def _train(config, run_dir):
    """One run's figures (see the module docstring); `config`: a RunConfig as a dict."""
    from pangu_moe.train.metrics import read
    from pangu_moe.train.trainer import Trainer
    cfg = RunConfig.from_dict(config)
    trainer = Trainer(cfg, run_dir, log=lambda line: None)
    summary = trainer.train()
    if not summary["tokens_per_s"]:
        raise ConfigError(f"--steps = {cfg.train.steps}: too few to time a step (the first one compiles); use at "
                          f"least 2")
    scales = [r["loss_scale"] for r in read(os.path.join(run_dir, "metrics.jsonl")) if "loss_scale" in r]
    initial = cfg.train.loss_scale if cfg.train.precision == "fp16" else 1.0
    backoffs, growths = scale_moves(initial, scales)
    return {"val_bpb": summary["val_bpb"],
            "step_seconds": cfg.train.batch_size * cfg.model.seq_len / summary["tokens_per_s"],
            "skipped_steps": summary["skipped_steps"], "loss_scale": scales[-1], "loss_scale_backoffs": backoffs,
            "loss_scale_growths": growths, "param_and_state_bytes": _state_bytes(trainer)}


def run(steps=None, config=DEMO_CONFIG, log=print, seeds=SEEDS, isolated=True):
    """Train every arm on each seed; `steps` (default the config's) caps train.steps and the warmup with it.
    `isolated`: each run in a fresh process (False keeps them in this one: the tests' tiny runs).

    Returns {steps, seeds, runs: {arm: [per-seed figures]}, arms: {arm: {val_bpb, step_seconds: mean_ci95}},
    <arm>_over_fp32_bpb and <arm>_over_fp32_step_time: mean_ci95 of the per-seed ratios,
    fp16_router_low_minus_fp16_bpb: the paired val bpb difference of the two fp16 arms, loss_scale_backoffs and
    loss_scale_growths: summed over the `fp16` arm's runs, skipped_steps and param_and_state_bytes per arm
    (summed over seeds / of seed 0)}.
    """
    from pangu_moe.studies.routers import in_fresh_process
    from pangu_moe.studies.stats import mean_ci95, paired_difference
    if seeds < 1:
        raise ConfigError(f"seeds = {seeds}: must be >= 1")
    scratch = tempfile.mkdtemp(prefix="bench_precision_")
    runs = {arm: [] for arm in ARMS}
    try:
        for seed in range(seeds):
            for arm in ARMS:
                cfg = _config(config, arm, seed, steps)
                log(f"bench precision: {arm} seed {seed}, {cfg.train.steps} steps")
                args = (cfg.to_dict(), os.path.join(scratch, f"{arm}_seed{seed}"))
                runs[arm].append(in_fresh_process(_train, *args) if isolated else _train(*args))
                log(f"bench precision: {arm} seed {seed}: val_bpb {runs[arm][-1]['val_bpb']:.4f}, "
                    f"{runs[arm][-1]['step_seconds'] * 1e3:.0f} ms/step")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"steps": cfg.train.steps, "seeds": seeds, "runs": runs,
              "arms": {arm: {f: mean_ci95([r[f] for r in per_seed]) for f in ("val_bpb", "step_seconds")}
                       for arm, per_seed in runs.items()},
              "loss_scale_backoffs": sum(r["loss_scale_backoffs"] for r in runs["fp16"]),
              "loss_scale_growths": sum(r["loss_scale_growths"] for r in runs["fp16"]),
              "skipped_steps": {arm: sum(r["skipped_steps"] for r in per_seed) for arm, per_seed in runs.items()},
              "param_and_state_bytes": {arm: per_seed[0]["param_and_state_bytes"] for arm, per_seed in runs.items()}}
    result["fp16_router_low_minus_fp16_bpb"] = paired_difference(
        [r["val_bpb"] for r in runs["fp16_router_low"]], [r["val_bpb"] for r in runs["fp16"]])
    for arm in ARMS:
        if arm != "fp32":
            for field, name in (("val_bpb", "bpb"), ("step_seconds", "step_time")):
                result[f"{arm}_over_fp32_{name}"] = mean_ci95([a[field] / b[field]
                                                               for a, b in zip(runs[arm], runs["fp32"])])
    return result


def table(result):
    """Human-readable lines for `run`'s result."""
    def figure(x, fmt):
        return fmt.format(x["mean"]) + ("" if x["ci95"] is None else " ± " + fmt.format(x["ci95"]))

    lines = [f"precision vs fp32, demo model, {result['steps']} steps, {result['seeds']} paired seed(s)",
             f"  {'arm':16s} {'val_bpb':>17s} {'ms/step':>8s} {'skipped':>8s} {'param+state MB':>15s}"]
    for arm, summary in result["arms"].items():
        lines.append(f"  {arm:16s} {figure(summary['val_bpb'], '{:.4f}'):>17s} "
                     f"{summary['step_seconds']['mean'] * 1e3:8.0f} {result['skipped_steps'][arm]:8d} "
                     f"{result['param_and_state_bytes'][arm] / 1e6:15.2f}")
    for arm in ARMS:
        if arm != "fp32":
            lines.append(f"  {arm}_over_fp32_bpb = {figure(result[f'{arm}_over_fp32_bpb'], '{:.4f}')}"
                         f"{'  (target: upper end <= 1.02)' if arm in ('fp16', 'bf16') else ''}; step time "
                         f"{result[f'{arm}_over_fp32_step_time']['mean']:.2f} x (reported)")
    lines.append(f"  fp16 loss scale (window {FP16_WINDOW}): {result['loss_scale_backoffs']} backoffs, "
                 f"{result['loss_scale_growths']} growths over the fp16 runs")
    return "\n".join(lines)
