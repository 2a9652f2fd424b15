"""Expert-parallel step times: `simulated` over `local` in one process, and `msrun_cpu` (W processes).

The model is the demo's (configs/demo_cpu.yaml) on 2 nodes x 2 devices, the same global batch for
every backend. `local` and `simulated` train steps alternate (local, simulated, local, ...) after
two warmup steps each, so machine drift hits both alike; each figure is a median. `msrun_cpu` runs
`run_scripts/run_msrun_cpu.sh` with W workers for `steps` steps; its step time is tokens per step
over the run's `tokens_per_s`, which excludes each process's first (compiling) step. On a 2-core
machine the W worker processes share two cores, and the CPU exchange gathers the whole world (W x
the bytes of an all-to-all), so that figure is a functional check of the real multi-process path,
not a speed claim.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.configs import DEMO_CONFIG
from pangu_moe.config import RunConfig
from pangu_moe.train.schedule import learning_rate

LAUNCHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "run_msrun_cpu.sh")
CLUSTER = ("parallel.nodes=2", "parallel.devices_per_node=2")


def _step_seconds(trainer, batch, step):
    t = trainer.cfg.train
    lr = Tensor(learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.steps), ms.float32)
    began = time.perf_counter()
    train_step = trainer.train_step_for(trainer.capacity)[0]  # the static capacity's step, built once
    out = train_step(*(Tensor(a[trainer.rows]) for a in batch), lr)
    out[0].asnumpy()
    return time.perf_counter() - began


def run(repeats=10, msrun_steps=12, config=DEMO_CONFIG, log=print):
    """Returns {local_step_s, simulated_step_s, simulated_over_local, msrun_cpu_step_s, msrun_cpu_over_local,
    world_size, tokens_per_step}."""
    from pangu_moe.train.trainer import Trainer
    scratch = tempfile.mkdtemp(prefix="bench_ep_")
    try:
        trainers = {name: Trainer(RunConfig.from_yaml(config, [*CLUSTER, f"parallel.dispatch={name}"]),
                                  os.path.join(scratch, name), log=lambda line: None)
                    for name in ("local", "simulated")}
        times = {name: [] for name in trainers}
        for step, batch in zip(range(repeats + 2), trainers["local"].batches(0)):
            for name, trainer in trainers.items():
                seconds = _step_seconds(trainer, batch, step)
                if step >= 2:  # the first two steps compile and warm up
                    times[name].append(seconds)
        local, simulated = (float(np.median(times[n])) for n in ("local", "simulated"))
        log(f"local {local:.3f} s/step, simulated {simulated:.3f} s/step; msrun_cpu: {msrun_steps} steps on 4 "
            f"processes")
        msrun = _msrun_step_seconds(config, msrun_steps, os.path.join(scratch, "msrun"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cfg = trainers["local"].cfg
    return {"local_step_s": local, "simulated_step_s": simulated, "simulated_over_local": simulated / local,
            "msrun_cpu_step_s": msrun, "msrun_cpu_over_local": msrun / local,
            "world_size": trainers["local"].topology.world_size,
            "tokens_per_step": cfg.train.batch_size * cfg.model.seq_len}


def _msrun_step_seconds(config, steps, run_dir):
    sets = [a for o in (*CLUSTER, "parallel.dispatch=msrun_cpu", f"train.steps={steps}", f"train.eval_every={steps}",
                        "train.eval_batches=1", f"train.checkpoint_every={steps}", "train.warmup_steps=1")
            for a in ("--set", o)]
    cmd = ["bash", LAUNCHER, "--workers", "4", "--python", sys.executable, "--log-dir", run_dir + "_logs", "--",
           "train", "--config", config, "--out", run_dir, *sets]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench ep: msrun_cpu run failed: {done.stderr.strip()[-400:]}")
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    cfg = RunConfig.from_yaml(os.path.join(run_dir, "config.yaml"))
    return cfg.train.batch_size * cfg.model.seq_len / summary["tokens_per_s"]


def table(result):
    """Human-readable lines."""
    return "\n".join([
        f"W = {result['world_size']} ranks (2 nodes x 2 devices), {result['tokens_per_step']} tokens per step",
        f"local      {result['local_step_s']:.3f} s/step",
        f"simulated  {result['simulated_step_s']:.3f} s/step   "
        f"simulated_over_local {result['simulated_over_local']:.3f}",
        f"msrun_cpu  {result['msrun_cpu_step_s']:.3f} s/step   "
        f"msrun_cpu_over_local {result['msrun_cpu_over_local']:.3f}  (4 processes on this machine's cores; the CPU "
        f"exchange is a world AllGather)",
    ])
