"""Expert-parallel step times and bytes: `simulated` (ragged and padded exchange) over `local` in one process,
and `msrun_cpu` (W processes).

The model is the demo's (configs/demo_cpu.yaml: Switch top-1 routing, capacity factor 1.25) on 2 nodes x 2
devices, the same global batch for every backend. The `local`, `simulated` (ragged exchange, the default)
and `simulated_padded` train steps alternate after two warmup steps each, so machine drift hits all alike;
each figure is a median. The exchange times are modelled (`accounting.cost.modelled_exchange_seconds` on
the config's links) from the ragged run's routing. `ragged_over_padded_bytes` is measured routing: the bytes the
ragged exchange sent
over the timed steps of the ragged run (the kept choices' rows both ways plus each remote block's occupancy,
`accounting.traffic.exchange_bytes`, the rows `dispatch.ragged.pack` sends) over the padded exchange's
buffers at the same capacity. The simulated exchange runs in one process, so its time says what the extra
packing costs on a CPU, not what the bytes cost on a network.

`msrun_cpu` runs `run_scripts/run_msrun_cpu.sh` with W workers for `steps` steps; its step time is tokens
per step over the run's `tokens_per_s`, which excludes each process's first (compiling) step. On a 2-core
machine the W worker processes share two cores, and the CPU exchange gathers the whole world (W x the
bytes of an all-to-all), so that figure is a functional check of the real multi-process path, not a speed
claim.
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

from pangu_moe.accounting.cost import Links, modelled_exchange_seconds
from pangu_moe.accounting.traffic import exchange_bytes
from pangu_moe.configs import DEMO_CONFIG
from pangu_moe.config import RunConfig
from pangu_moe.precision import BYTES
from pangu_moe.train.schedule import learning_rate

LAUNCHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "run_msrun_cpu.sh")
CLUSTER = ("parallel.nodes=2", "parallel.devices_per_node=2")


ARMS = {"local": ["parallel.dispatch=local"], "simulated": ["parallel.dispatch=simulated"],
        "simulated_padded": ["parallel.dispatch=simulated", "parallel.exchange_layout=padded"]}


def _step(trainer, batch, step):
    """One train step at the static capacity: (seconds, kept_per_expert [L, W, E] numpy)."""
    t = trainer.cfg.train
    lr = Tensor(learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.steps), ms.float32)
    began = time.perf_counter()
    train_step = trainer.train_step_for(trainer.capacity)[0]  # the static capacity's step, built once
    out = train_step(*(Tensor(a[trainer.rows]) for a in batch), lr)
    kept = out[5].asnumpy()
    return time.perf_counter() - began, kept


def run(repeats=10, msrun_steps=12, config=DEMO_CONFIG, log=print):
    """Returns {local_step_s, simulated_step_s, simulated_padded_step_s, simulated_over_local,
    ragged_over_padded_step, ragged_bytes_per_step, padded_bytes_per_step, ragged_over_padded_bytes,
    ragged_exchange_ms_modelled, padded_exchange_ms_modelled (per step, all MoE layers),
    msrun_cpu_step_s, msrun_cpu_over_local (None when msrun_steps is 0), world_size, tokens_per_step}."""
    from pangu_moe.train.trainer import Trainer
    scratch = tempfile.mkdtemp(prefix="bench_ep_")
    try:
        trainers = {name: Trainer(RunConfig.from_yaml(config, [*CLUSTER, *extra]), os.path.join(scratch, name),
                                  log=lambda line: None) for name, extra in ARMS.items()}
        ragged = trainers["simulated"]
        cfg, topology = ragged.cfg, ragged.topology
        times = {name: [] for name in trainers}
        moved = {"ragged": 0, "padded": 0}
        modelled = {"ragged": 0.0, "padded": 0.0}  # seconds of exchange on the config's links, summed over steps
        links = Links.from_config(cfg.parallel)
        for step, batch in zip(range(repeats + 2), ragged.batches(0)):
            for name, trainer in trainers.items():
                seconds, kept = _step(trainer, batch, step)
                if step < 2:  # the first two steps compile and warm up
                    continue
                times[name].append(seconds)
                if name == "simulated":
                    for layer in kept:
                        sent = exchange_bytes(layer, trainer.capacity, topology, cfg.model.hidden,
                                              BYTES[cfg.train.precision])
                        for layout in moved:
                            moved[layout] += sum(sent[layout].values())
                            modelled[layout] += modelled_exchange_seconds(
                                layer, trainer.capacity, topology, cfg.model.hidden, BYTES[cfg.train.precision],
                                links, layout)
        step_s = {name: float(np.median(t)) for name, t in times.items()}
        log(", ".join(f"{name} {s:.3f} s/step" for name, s in step_s.items()) +
            (f"; msrun_cpu: {msrun_steps} steps on 4 processes" if msrun_steps else ""))
        msrun = _msrun_step_seconds(config, msrun_steps, os.path.join(scratch, "msrun")) if msrun_steps else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    local = step_s["local"]
    return {"local_step_s": local, "simulated_step_s": step_s["simulated"],
            "simulated_padded_step_s": step_s["simulated_padded"], "simulated_over_local": step_s["simulated"] / local,
            "ragged_over_padded_step": step_s["simulated"] / step_s["simulated_padded"],
            "ragged_bytes_per_step": moved["ragged"] / repeats, "padded_bytes_per_step": moved["padded"] / repeats,
            "ragged_over_padded_bytes": moved["ragged"] / moved["padded"],
            "ragged_exchange_ms_modelled": 1e3 * modelled["ragged"] / repeats,
            "padded_exchange_ms_modelled": 1e3 * modelled["padded"] / repeats,
            "msrun_cpu_step_s": msrun, "msrun_cpu_over_local": None if msrun is None else msrun / local,
            "world_size": topology.world_size, "tokens_per_step": cfg.train.batch_size * cfg.model.seq_len}


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
    lines = [
        f"W = {result['world_size']} ranks (2 nodes x 2 devices), {result['tokens_per_step']} tokens per step",
        f"local             {result['local_step_s']:.3f} s/step",
        f"simulated         {result['simulated_step_s']:.3f} s/step   "
        f"simulated_over_local {result['simulated_over_local']:.3f}  (ragged exchange)",
        f"simulated_padded  {result['simulated_padded_step_s']:.3f} s/step   "
        f"ragged_over_padded_step {result['ragged_over_padded_step']:.3f}  (measured, one process)",
        f"exchange bytes    ragged {result['ragged_bytes_per_step'] / 1e6:.2f} MB/step, padded "
        f"{result['padded_bytes_per_step'] / 1e6:.2f} MB/step   ragged_over_padded_bytes "
        f"{result['ragged_over_padded_bytes']:.3f}  (measured routing)",
        f"exchange time     ragged {result['ragged_exchange_ms_modelled']:.3f} ms/step, padded "
        f"{result['padded_exchange_ms_modelled']:.3f} ms/step  (modelled on parallel.*_gbps / *_latency_us links)"]
    if result["msrun_cpu_step_s"] is not None:
        lines.append(f"msrun_cpu         {result['msrun_cpu_step_s']:.3f} s/step   msrun_cpu_over_local "
                     f"{result['msrun_cpu_over_local']:.3f}  (4 processes on this machine's cores; the CPU exchange "
                     f"is a world AllGather)")
    return "\n".join(lines)
