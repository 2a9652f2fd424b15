"""The training loop: compiled steps, periodic evaluation, metrics, checkpoints, summary."""
import hashlib
import json
import math
import os
import signal
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe import runtime
from pangu_moe.accounting.cost import Links, modelled_exchange_seconds
from pangu_moe.accounting.traffic import PLACES, layer_record, rank_balance, route_classes, window_load_stats
from pangu_moe.capacity import capacity_bucket, capacity_ladder, expert_capacity, once, plan_capacities
from pangu_moe.checks import check
from pangu_moe.config import MULTI_PROCESS_BACKENDS, ConfigError, RunConfig
from pangu_moe.data import pipeline
from pangu_moe.data.source import RunData, check_tokenizer, record_tokenizer
from pangu_moe.dispatch.topology import Topology
from pangu_moe.model.pangu import build_model, is_expert_parameter
from pangu_moe.ops import run_kernel_backend
from pangu_moe.precision import BYTES, LossScaler
from pangu_moe.progress import Progress
from pangu_moe.routing.base import LOSS_NAMES
from pangu_moe.train import checkpoint
from pangu_moe.train.data_parallel import DataParallel
from pangu_moe.train.evaluate import Evaluator
from pangu_moe.train import metrics as metrics_file
from pangu_moe.train.metrics import MetricsLog, TensorBoardLog
from pangu_moe.train.optim import HybridEpsAdamW
from pangu_moe.train.profile import StepProfiler
from pangu_moe.train.placement import ExpertPlacement
from pangu_moe.train.restore import STATE_KEYS
from pangu_moe.train.schedule import learning_rate
from pangu_moe.train.stop import StopOnSignal, TrainingStopped
from pangu_moe.train.steps import make_eval_step, make_train_step

# Trajectory fields added after checkpoints began to carry a config fingerprint, with their defaults.
ADDED_FIELDS = {"train.fused_optimizer": False, "parallel.placement": [], "parallel.placement_every": 0,
                "parallel.placement_hysteresis": 1.0}
# What the start line adds to train.precision on a device (CPU fp16 matmuls are slower than fp32 ones: a demo step
# took 2.69x as long, mean of 3 seeds, docs/results/2026-12-07-precision.md).
PRECISION_NOTES = {("fp16", "CPU"): " (on CPU about 2.7x slower than fp32: for checking numerics, not for speed)",
                   ("bf16", "CPU"): " (on CPU: fp32 matmuls of bf16-rounded operands)"}
LOAD_WINDOW = 0.2  # summary load statistics cover the final 20% of the steps
REFERENCE_CAPACITY_FACTOR = 1.1  # capacity_ratio is reported against this (the LocMoE+ baseline)
# Fields a resumed run may change without changing the trajectory of the steps already planned.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.max_skipped_steps", "runtime.mode",
                     "runtime.checkpoint_format", "runtime.async_checkpoint", "runtime.profile_steps",
                     "parallel.grad_bucket_mb"}


class Trainer:
    """Builds data, model and optimizer from a `RunConfig` and trains into `run_dir`.

    Args:
        cfg: validated RunConfig.
        run_dir: output folder (config.yaml, metrics.jsonl, checkpoints/, summary.json).
        log: callable taking one progress line.
    """

    def __init__(self, cfg, run_dir, log=print):
        self.cfg, self.run_dir = check(cfg), run_dir  # before the corpus and the model are built
        self.rank = runtime.setup(cfg.runtime, cfg.parallel)
        self.log = log if self.rank == 0 else _silent  # rank 0 writes logs and outputs for the whole world
        m, moe, t = cfg.model, cfg.moe, cfg.train
        # A run dir with checkpoints (resume, eval) holds the BPE its run trained; a fresh run trains its own.
        self.data = RunData(cfg, run_dir=run_dir if checkpoint.list_checkpoints(run_dir) else None)
        self.topology = Topology(cfg.parallel.nodes, cfg.parallel.devices_per_node, moe.num_experts)
        world = self.topology.world_size
        self.rows = slice(None)  # the rows of each global batch this process trains on
        if cfg.parallel.dispatch in MULTI_PROCESS_BACKENDS:
            per_rank = t.batch_size // world
            self.rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        # Before any window is read (the capacity plan reads the first batch, the evaluator the validation set):
        # each process checks the shards it will read, so a damaged copy on any node stops with one line.
        self.data.verify(self._ranks_read(), world)
        self.model = build_model(cfg, self.rank)
        if self.rank:
            # Every rank drew the same weights from the seed. Training noise comes from the per-step buffers
            # (`Router.enable_fed_noise`), the same on every backend; any stateful draw left gets its own stream.
            ms.set_seed(cfg.runtime.seed + self.rank)
        scaler = LossScaler(t.precision == "fp16", t.loss_scale, t.loss_scale_window, t.loss_scale_backoff)
        self.optimizer = HybridEpsAdamW(self.model.trainable_params(), t.beta1, t.beta2, t.eps, t.expert_eps,
                                        t.weight_decay, scaler, t.fused_optimizer)
        self.data_parallel = None
        if cfg.parallel.dispatch in MULTI_PROCESS_BACKENDS:
            self.data_parallel = DataParallel(self.optimizer.parameters, world,
                                              int(cfg.parallel.grad_bucket_mb * 2 ** 20))
        self.placement = ExpertPlacement(self.model, self.optimizer, self.topology, cfg.parallel.placement_every,
                                         BYTES[t.precision], cfg.parallel.placement_hysteresis, self.data_parallel,
                                         self.rank)
        self.tokens_per_step = t.batch_size * m.seq_len
        # Each rank routes its own batch_size/W sequences as one group: capacities are per rank group.
        self.group_tokens = self.tokens_per_step // self.topology.world_size
        self.routers = [block.moe.router for block in self.model.moe_blocks]
        plan = plan_capacities(moe, self.group_tokens, self.routers, self._step0_inputs, self.log)
        self.capacity, self.capacity_proposals = plan.train, plan.proposals
        for router in self.routers:
            router.start(self.capacity)
        self.train_steps = {}  # (capacity bucket, must fit) -> its compiled training step (`train_step_for`)
        # Dropless runs size their buffers by the largest demand of a (rank, expert) seen last, not by T.
        self.expected_demand = expert_capacity(self.group_tokens, moe.num_experts, moe.top_k, 1.25) \
            if moe.slot_policy == "none" else None
        self.reruns = 0  # dropless steps rerun with larger buffers since the last metrics record
        self.estimates = []  # the routers' before_step reports since the last metrics record
        self._background = None  # the checkpoint being written in the background (`runtime.async_checkpoint`)
        self.evaluator = Evaluator(self.data.val_windows(), cfg.data.domains, t.batch_size,
                                   make_eval_step(self.model, plan.eval, cfg.runtime.mode == "graph",
                                                  self.data_parallel), self.rows, self.data.tokenizer.token_bytes())

    def train_step_for(self, bucket, must_fit=False):
        """The training step compiled for buffers of `bucket` slots per expert (`make_train_step`), built on
        first use and logged: (step, True if built now)."""
        key = (bucket, must_fit)
        built = key not in self.train_steps
        if built:
            t = self.cfg.train
            self.train_steps[key] = make_train_step(self.model, self.optimizer, bucket, t.grad_clip,
                                                    self.cfg.runtime.mode == "graph", self.data_parallel, must_fit)
            self.log(f"training step for capacity bucket C = {bucket}{' (must fit)' if must_fit else ''}: "
                     f"{len(self.train_steps)} built; buckets {capacity_ladder(self.capacity)}")
        return self.train_steps[key], built

    def run_step(self, capacities, inputs):
        """Train one batch with buffers sized by the capacity in force, not by the static one.

        The bucket (`capacity.capacity_bucket`) holds the largest capacity in force (`Router.live_capacity`);
        a router below it still keeps at most its own, so every bucket trains the kept tokens alike while the
        buffers, expert compute and exchange shrink with the bucket. A dropless run (C = T) holds the largest
        demand of a (rank, expert) seen at the previous step instead; a step whose demand does not fit applies
        nothing and is rerun with buffers that hold it, so no choice is ever dropped.

        Args: capacities: per MoE layer; inputs: (input_ids, labels, domain_ids, lr) Tensors of this process.
        Returns: (the step's outputs as numpy, bucket, seconds, False if a step was compiled on the way).
        """
        limit = capacity_bucket(max(capacities), self.capacity)
        bucket = limit if self.expected_demand is None else min(limit, capacity_bucket(self.expected_demand,
                                                                                       self.capacity))
        seconds, timed = 0.0, True
        while True:
            train_step, built = self.train_step_for(bucket, must_fit=bucket < limit)
            began = time.perf_counter()
            out = [o.asnumpy() for o in train_step(*inputs)]
            seconds += time.perf_counter() - began
            timed = timed and not built  # a bucket's first step includes its graph compilation
            demand = int(out[4].max())
            if self.expected_demand is not None:
                self.expected_demand = demand
            if bucket >= limit or demand <= bucket:
                return out, bucket, seconds, timed
            bucket = min(limit, capacity_bucket(demand, self.capacity))
            self.reruns += 1

    def _exchange_seconds(self, kept, slots, topology):
        """Modelled exchange time of one layer at this step's routing (`accounting.cost.modelled_exchange_seconds`
        with the run's links, layout and algorithm): kept [W, E]; slots: the buffers' slots per expert; topology:
        where the layer's experts were."""
        p = self.cfg.parallel
        return modelled_exchange_seconds(kept, slots, topology, self.cfg.model.hidden,
                                         BYTES[self.cfg.train.precision], Links.from_config(p), p.exchange_layout,
                                         p.exchange == "hierarchical")

    def _ranks_read(self):
        """The ranks whose training windows this process reads (those of its `rows`)."""
        per_rank = self.cfg.train.batch_size // self.topology.world_size
        rows = range(self.cfg.train.batch_size)[self.rows]
        return range(rows.start // per_rank, rows.stop // per_rank)

    def _step0_inputs(self):
        """Every MoE layer's router input on the step-0 batch, routed without dropping, for the routers' capacity
        proposals: always that batch under the seeded initial weights, so a resumed run plans the same
        capacities as the original one."""
        input_ids, _, domain_ids = next(self.batches(0))
        return self.model.moe_inputs(Tensor(input_ids), Tensor(domain_ids), self.group_tokens)

    def batches(self, start_step):
        """This process's rows (`rows`) of the batches of steps start_step..train.steps-1: (input_ids, labels,
        domain_ids) numpy int32 [b, S]; the other processes' rows are never read here. The routers' host-side
        probes (capacity proposals, LocMoE+'s re-estimate) see the global batch because the config allows them
        only where one process holds every rank."""
        return self.data.batches(start_step, self.topology.world_size, self.cfg.parallel.devices_per_node, self.rows)

    def _before_step(self, step, input_ids, domain_ids):
        """Every router's `before_step` for training step `step` (0-based), in layer order; returns each
        layer's capacity in force (`Router.live_capacity`, else the planned one).

        The routers share one evaluation forward of the batch about to be trained, run when the first router
        asks for its input: the layers above that router see the routing of the routers between them as it
        was before those routers' own `before_step` of this step.
        """
        inputs = once(lambda: self.model.moe_inputs(Tensor(input_ids), Tensor(domain_ids), self.capacity))
        reports = {}
        for i, router in enumerate(self.routers):
            report = router.before_step(step, lambda i=i: inputs()[i])
            if report:
                reports.setdefault(router.name, []).append(report)
                self.estimates.append({"step": step, "layer": i, **report})
        for name, found in reports.items():
            self.log(f"step {step}: {name} " + ", ".join(f"{key} {[f[key] for f in found]}" for key in found[0]))
        capacities = []
        for router in self.routers:
            live = router.live_capacity()
            capacities.append(self.capacity if live is None else live)
        return capacities

    def train(self, resume=False):
        """Train to `train.steps`, or with `resume` continue from the run dir's newest checkpoint.

        Returns the summary dict (also written to summary.json).
        """
        cfg, t = self.cfg, self.cfg.train
        resume_from = check_run_dir(cfg, self.run_dir, resume, self.log)
        if resume_from:
            check_tokenizer(self.run_dir, self.data.tokenizer, "--resume")
        state = {key: 0 for key in STATE_KEYS}
        state["train_seconds"] = 0.0
        if resume_from:
            state = self.load_checkpoint(resume_from)
            self.log(f"resumed from {resume_from} at step {state['step']}")
        os.makedirs(self.run_dir, exist_ok=True)
        sinks = []  # where rank 0 writes each logged record
        if self.rank == 0:
            cfg.save(os.path.join(self.run_dir, "config.yaml"))
            record_tokenizer(self.run_dir, self.data.tokenizer)
            sinks = [MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"),
                                keep_until_step=state["step"] if resume else None)]
            board = TensorBoardLog.open(self.run_dir)
            sinks += [board] if board else []
        batches = self.batches(state["step"])
        params = count_parameters(self.model, 1.0, self._expert_shards())[0]
        self.log(f"training {cfg.moe.router} router, {params:,} parameters, C={self.capacity} slots/expert, "
                 f"{t.precision}{PRECISION_NOTES.get((t.precision, cfg.runtime.device), '')}, "
                 f"steps {state['step']}..{t.steps} -> {self.run_dir}")
        profiler = StepProfiler(cfg.runtime.profile_steps, self.run_dir, self.log)
        try:
            with StopOnSignal() as stopper:
                self._loop(state, batches, sinks, stopper, profiler)
        except BaseException:
            self._wait_for_save(raise_errors=False)  # the error in flight is the one to report
            raise
        finally:
            profiler.close()
            for sink in sinks:
                sink.close()
        self._wait_for_save()
        return self._finish(state)

    def _loop(self, state, batches, sinks, stopper, profiler):
        """Train from `state["step"]` to `train.steps`, writing each logged record to `sinks` and profiling the
        steps of `runtime.profile_steps` with `profiler`; after a SIGINT/SIGTERM (`stopper`) the step in flight
        ends, a checkpoint is written and `TrainingStopped` raised."""
        cfg, t = self.cfg, self.cfg.train
        window_tokens, window_seconds, compiling, compiled = 0, 0.0, 0.0, 0
        scale_before = float(self.optimizer.loss_scaler.scale.asnumpy())
        for input_ids, labels, domain_ids in batches:
            profiler.before_step(state["step"])
            lr = learning_rate(state["step"], t.lr, t.min_lr, t.warmup_steps, t.steps)
            capacities = self._before_step(state["step"], input_ids, domain_ids)
            state["capacity_sum"] += float(np.mean(capacities))
            # Training noise is a function of (seed, step), the same in every process: no RNG state to save.
            self.model.feed_noise(np.random.default_rng([cfg.runtime.seed, state["step"]]))
            out, bucket, seconds, timed = self.run_step(capacities, (
                Tensor(input_ids), Tensor(labels), Tensor(domain_ids), Tensor(lr, ms.float32)))
            loss, lm_loss, router_losses, grad_norm, demand, kept, loss_scale, inter_rows = out
            state["step"] = step = state["step"] + 1
            profiler.after_step(step - 1)
            topologies = self.placement.topologies()  # where this step's experts were
            if np.isfinite(loss) and np.isfinite(grad_norm):
                state["consecutive_skips"] = 0
                self._count_routing(state, demand, kept, topologies)
                self.placement.observe(kept)
            else:
                self._skip(state, loss, grad_norm, scale_before, loss_scale)
            self.placement.after_step(step)
            scale_before = loss_scale
            if timed:
                state["train_seconds"] += seconds
                state["train_tokens"] += self.tokens_per_step
                window_tokens += self.tokens_per_step
                window_seconds += seconds
            else:
                compiling, compiled = compiling + seconds, compiled + 1
            do_eval = step % t.eval_every == 0 or step == t.steps
            if step % t.log_every == 0 or do_eval:
                counted = self.model.moe_blocks[0].moe.deduplicates  # the hierarchical exchange's own row counts
                record = {"step": step, "loss": float(loss), "lm_loss": float(lm_loss),
                          **{name: float(v) for name, v in zip(LOSS_NAMES, router_losses)},
                          "lr": lr, "grad_norm": float(grad_norm), "skipped_steps": state["skipped_steps"],
                          "loss_scale": float(loss_scale),
                          "tokens_per_s": window_tokens / window_seconds if window_seconds else 0.0,
                          "capacity_bucket": bucket, "reruns": self.reruns, "compile_seconds": compiling,
                          "compiled_steps": compiled,
                          "modelled_exchange_ms": 1e3 * sum(self._exchange_seconds(k, bucket, topology)
                                                            for k, topology in zip(kept, topologies)),
                          "layers": [layer_record(d, k, c, topology, cfg.model.hidden, BYTES[t.precision], bucket,
                                                  rows if counted else None)
                                     for d, k, c, topology, rows in zip(demand, kept, capacities, topologies,
                                                                        inter_rows)]}
                if self.estimates:
                    record["estimates"] = self.estimates
                    self.estimates = []
                if self.placement.events:
                    record["placements"] = self.placement.events
                    self.placement.events = []
                if do_eval:
                    val = self.evaluator.evaluate(t.eval_batches)
                    record.update(val_loss=val["val_loss"], val_bpb=val["val_bpb"])
                for sink in sinks:
                    sink.write(record)
                per_step = state["train_seconds"] * self.tokens_per_step / max(1, state["train_tokens"])
                self.log(progress_line(record, t.steps, per_step))
                window_tokens, window_seconds, compiling, compiled, self.reruns = 0, 0.0, 0.0, 0, 0
            if step % t.checkpoint_every == 0 or step == t.steps:
                self._save(state)
            signum = self._agreed_stop(stopper.signum)
            if signum and step < t.steps:
                if step % t.checkpoint_every:
                    self._save(state)
                self._wait_for_save()
                raise TrainingStopped(signum, step, checkpoint.step_path(self.run_dir, step), self._resume_hint())

    def _agreed_stop(self, signum):
        """The signal to stop for after this step, or None. Processes of a multi-process backend agree (a scalar
        all-reduce a step), so that all of them save the same step even when only some were signalled."""
        if self.data_parallel is None:
            return signum
        signalled = float(self.data_parallel.mean(Tensor(1.0 if signum else 0.0, ms.float32)).asnumpy())
        return (signum or signal.SIGTERM) if signalled > 0 else None

    def _resume_hint(self):
        if self.cfg.parallel.dispatch in MULTI_PROCESS_BACKENDS:
            return "the same launch command with --resume"
        return f"pangu-moe train --config {os.path.join(self.run_dir, 'config.yaml')} --out {self.run_dir} --resume"

    def _count_routing(self, state, demand, kept, topologies):
        """Host-side router updates and the run's token accounting of a step that was applied (`topologies`: where
        each MoE layer's experts were)."""
        for router, layer_demand in zip(self.routers, demand):
            router.after_step(layer_demand.sum(0))
        state["choices_total"] += int(demand.sum())
        state["kept_total"] += int(kept.sum())
        for layer_kept, topology in zip(kept, topologies):
            for place, count in route_classes(layer_kept, topology).items():
                state["routed_" + place] += count

    def _skip(self, state, loss, grad_norm, scale_before, loss_scale):
        """Count a step whose loss or gradient norm was not finite (the step already changed nothing); abort
        after `train.max_skipped_steps` of them in a row. An fp16 step with a finite loss whose gradients
        overflowed while the loss scale could still back off (`scale_before` the step above 1) is counted but
        not held against the limit: backing off is the remedy."""
        state["skipped_steps"] += 1
        limit, step = self.cfg.train.max_skipped_steps, state["step"]
        if self.optimizer.loss_scaler.dynamic and np.isfinite(loss) and scale_before > 1:
            self.log(f"step {step}: fp16 gradients overflowed: skipped, no update; loss scale now {loss_scale:g}")
            return
        state["consecutive_skips"] += 1
        self.log(f"step {step}: loss {float(loss)}, gradient norm {float(grad_norm)}: skipped, no update "
                 f"({state['consecutive_skips']} in a row, limit train.max_skipped_steps = {limit})")
        if state["consecutive_skips"] >= limit:
            raise FloatingPointError(f"steps {step - limit + 1}..{step}: {limit} in a row with a non-finite loss or "
                                     f"gradient norm (train.max_skipped_steps); lower train.lr or raise "
                                     f"train.warmup_steps, then --resume from the last checkpoint")

    def load_checkpoint(self, path):
        """Load a checkpoint into the model and optimizer (this rank's shard on a multi-process backend, all
        shards joined otherwise); returns the trainer state."""
        rank = self.rank if self.data_parallel else None
        return checkpoint.load(path, [self.model, self.optimizer], STATE_KEYS, rank, self.topology.world_size)

    def _expert_shards(self):
        return self.topology.world_size if self.data_parallel else 1

    def _save(self, state):
        """Checkpoint `state` and the weights; with `runtime.async_checkpoint` a copy is taken here and written by a
        `checkpoint.BackgroundWrite` while training goes on (the previous one is waited for first)."""
        self._wait_for_save()
        cells, file_format = [self.model, self.optimizer], self.cfg.runtime.checkpoint_format
        folder = checkpoint.step_path(self.run_dir, state["step"])
        if self.cfg.runtime.async_checkpoint:  # a one-process backend (`RunConfig.validate`)
            arrays, saved_state = checkpoint.snapshot(folder, cells), dict(state)

            def work():
                checkpoint.write(folder, arrays, saved_state, config_fingerprint(self.cfg), file_format=file_format)
                self._prune()
            self._background = checkpoint.BackgroundWrite(work)
            return
        if self.data_parallel is None:
            checkpoint.save(folder, cells, state, config_fingerprint(self.cfg), file_format=file_format)
        else:
            world, experts = self.topology.world_size, self.cfg.moe.num_experts
            shards = [list(range(r * experts // world, (r + 1) * experts // world)) for r in range(world)]
            checkpoint.save(folder, cells, state, config_fingerprint(self.cfg), self.rank, shards,
                            self.data_parallel.barrier, file_format)
        self._prune()

    def _wait_for_save(self, raise_errors=True):
        """Wait for a background checkpoint write; re-raises its error, or only logs it without `raise_errors`."""
        if self._background is not None:
            background, self._background = self._background, None
            try:
                background.wait()
            except Exception as e:
                if raise_errors:
                    raise
                self.log(f"the background checkpoint write failed too: {e}")

    def _prune(self):
        """Delete all but the newest `train.keep_checkpoints` checkpoints (rank 0)."""
        keep = self.cfg.train.keep_checkpoints
        if keep and self.rank == 0:
            for _, path in checkpoint.list_checkpoints(self.run_dir)[:-keep]:
                checkpoint.remove(path)

    def _finish(self, state):
        cfg = self.cfg
        val = self.evaluator.evaluate(progress=Progress("final evaluation", "batches", log=self.log).update)
        unigram = pipeline.unigram_bpb(self.evaluator.scored_labels(), self.evaluator.token_bytes)
        reference = expert_capacity(self.group_tokens, cfg.moe.num_experts, cfg.moe.top_k,
                                    REFERENCE_CAPACITY_FACTOR, 1)
        if self.rank != 0:
            return None
        tokenizer = self.data.tokenizer
        byte_unigram = pipeline.byte_unigram_bpb(self.evaluator.scored_labels(),
                                                 [tokenizer.piece(i) for i in range(tokenizer.vocab_size)])
        total, active = count_parameters(self.model, cfg.moe.top_k / cfg.moe.num_experts, self._expert_shards())
        routed = sum(state["routed_" + place] for place in PLACES)
        records = metrics_file.read(os.path.join(self.run_dir, "metrics.jsonl"))
        summary = {
            "steps": state["step"], "val_loss": val["val_loss"], "val_bpb": val["val_bpb"], "unigram_bpb": unigram,
            "bpb_over_unigram": val["val_bpb"] / unigram, "byte_unigram_bpb": byte_unigram,
            "bpb_over_byte_unigram": val["val_bpb"] / byte_unigram, "val_bpb_per_domain": val["val_bpb_per_domain"],
            "tokens_per_s": state["train_tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0,
            "router": cfg.moe.router, "top_k": cfg.moe.top_k, "num_experts": cfg.moe.num_experts,
            "num_groups": cfg.moe.num_groups,
            "dropped_fraction": 1.0 - state["kept_total"] / state["choices_total"] if state["choices_total"] else 0.0,
            "inter_node_fraction": state["routed_inter"] / routed if routed else 0.0,
            **{f"tokens_{place}": state["routed_" + place] for place in PLACES},
            **window_load_stats(records, state["step"], LOAD_WINDOW),
            "rank_balance": rank_balance(records, state["step"], 1.0),
            "rank_balance_last": rank_balance(records, state["step"], LOAD_WINDOW),
            "capacity": self.capacity,
            "capacity_ratio": state["capacity_sum"] / state["step"] / reference if state["step"] else 0.0,
            "capacity_mode": cfg.moe.capacity_mode, **self.capacity_proposals, "skipped_steps": state["skipped_steps"],
            "params_total": total, "params_active": active,
        }
        # modelled (parallel.*_gbps / _latency_us): the measured step time on this machine plus the exchange time
        # the step's routing would take on the configured links
        exchange = [r["modelled_exchange_ms"] / 1e3 for r in records if "modelled_exchange_ms" in r]
        summary["modelled_exchange_s_per_step"] = float(np.mean(exchange)) if exchange else 0.0
        # what the buckets' compilations cost (metrics.jsonl survives a resume, the steps' own time is inside)
        summary["compile_seconds"] = float(sum(r.get("compile_seconds", 0.0) for r in records))
        wall = state["train_seconds"] + summary["compile_seconds"]
        compiled = sum(r.get("compiled_steps", 0) for r in records)
        summary["wall_tokens_per_s"] = (state["train_tokens"] + self.tokens_per_step * compiled) / wall if wall else 0.0
        summary["modelled_step_s"] = (self.tokens_per_step / summary["tokens_per_s"] if summary["tokens_per_s"] else
                                      0.0) + summary["modelled_exchange_s_per_step"]
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
        self.log(f"done: val_bpb {val['val_bpb']:.3f} = {val['val_bpb'] / unigram:.3f} x token unigram ({unigram:.3f}) "
                 f"= {val['val_bpb'] / byte_unigram:.3f} x byte unigram ({byte_unigram:.3f}); "
                 f"dropped {summary['dropped_fraction']:.2%}; {summary['tokens_per_s']:,.0f} tokens/s")
        return summary


def _silent(line):
    """The log of ranks other than 0."""


def check_run_dir(cfg, run_dir, resume, log=None):
    """Refuse to mix runs: a fresh run needs a run dir without checkpoints; a resume needs a valid
    checkpoint written under the run's own config (up to `RESUMABLE_CHANGES`).

    Returns: the checkpoint to resume from (the newest that verifies; `log` hears of skipped ones), or None.
    """
    found = checkpoint.list_checkpoints(run_dir)
    if not resume:
        if found:
            raise ConfigError(f"--out {run_dir}: already holds checkpoints (up to step {found[-1][0]}); pass "
                              f"--resume to continue that run or choose a new --out")
        return None
    if not found:
        raise checkpoint.CheckpointError(f"--resume: no checkpoints in {os.path.join(run_dir, 'checkpoints')}")
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(config_path):
        saved, now = _trajectory(RunConfig.from_yaml(config_path)), _trajectory(cfg)
        changed = [k for k in now if now[k] != saved.get(k) and k not in RESUMABLE_CHANGES]
        if changed:
            hint = (f" (runtime.kernels resolves to {now[changed[0]]} here; --set runtime.kernels={saved[changed[0]]} "
                    f"continues the run as it trained)") if changed[0] == "runtime.kernels" else ""
            raise ConfigError(f"--resume: {changed[0]} = {now[changed[0]]!r} differs from {saved.get(changed[0])!r} in "
                              f"{config_path}{hint}; a resumed run may change only "
                              f"{', '.join(sorted(RESUMABLE_CHANGES))}")
    step, path = checkpoint.newest_valid(run_dir, log)
    if checkpoint.read_manifest(path)["config_sha256"] != config_fingerprint(cfg):
        raise checkpoint.CheckpointError(f"--resume: {path} was written under another config (its sha256 of the "
                                         f"trajectory fields differs from this run's); resume with the config it "
                                         f"was trained with")
    if step >= cfg.train.steps:
        raise ConfigError(f"train.steps = {cfg.train.steps}: the run already reached step {step}; raise "
                          f"train.steps to continue")
    return path


def config_fingerprint(cfg):
    """sha256 of the resolved config without `RESUMABLE_CHANGES`: equal for every config that continues the
    same trajectory. Stored in each checkpoint's manifest. Fields added since checkpoints carry it
    (`ADDED_FIELDS`) count only away from their default, so older checkpoints keep their fingerprint."""
    fields = {k: v for k, v in _trajectory(cfg).items()
              if k not in RESUMABLE_CHANGES and (k not in ADDED_FIELDS or v != ADDED_FIELDS[k])}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _trajectory(cfg):
    """The flattened config with runtime.kernels as the kernels it resolves to on its device and dispatch
    (reference, custom or ascend_builtin; `ops.run_kernel_backend`): `auto` continues a run that named what it picks,
    and checkpoints from before `auto` existed keep their fingerprint."""
    flat = _flatten(cfg.to_dict())
    backend = run_kernel_backend(cfg)
    flat["runtime.kernels"] = "custom" if backend in ("cpu", "ascend_c") else backend
    return flat


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def count_parameters(model, expert_share=1.0, expert_shards=1):
    """(total, active) trainable parameter counts of the whole model; active counts experts by
    `expert_share` (K / E); `expert_shards`: W when `model` holds one rank's expert shard."""
    total = active = 0
    for p in model.trainable_params():
        n = int(np.prod(p.shape)) * (expert_shards if is_expert_parameter(p.name) else 1)
        total += n
        active += n * expert_share if is_expert_parameter(p.name) else n
    return total, int(active)


def progress_line(record, total_steps, seconds_per_step):
    """One human line in bits: step, the LM loss in bits per token, the auxiliary loss, lr, throughput, ETA, and
    the validation bits per byte when present. (metrics.jsonl keeps the losses in nats.)"""
    remaining = int((total_steps - record["step"]) * seconds_per_step)
    line = (f"step {record['step']:>5}/{total_steps}  lm {record['lm_loss'] / math.log(2):.4f} bits/token  "
            f"aux {record['aux_loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
            f"eta {remaining // 60}m{remaining % 60:02d}s")
    if "val_bpb" in record:
        line += f"  | val {record['val_bpb']:.3f} bits/byte"
    return line
