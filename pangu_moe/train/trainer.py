"""The training loop: one compiled step, periodic evaluation, metrics, checkpoints, summary."""
import json
import math
import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe import runtime
from pangu_moe.capacity import expert_capacity
from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.data import pipeline
from pangu_moe.data.corpus import load_corpus
from pangu_moe.model.pangu import build_model, is_expert_parameter
from pangu_moe.train import checkpoint
from pangu_moe.train.metrics import MetricsLog, layer_records
from pangu_moe.train.optim import HybridEpsAdamW, clip_by_global_norm
from pangu_moe.train.schedule import learning_rate

STATE_KEYS = ("step", "choices_total", "kept_total", "train_seconds", "train_tokens")
REFERENCE_CAPACITY_FACTOR = 1.1  # capacity_ratio is reported against this (LocMoE+ baseline)


class Trainer:
    """Builds data, model and optimizer from a `RunConfig` and trains into `run_dir`.

    Args:
        cfg: validated RunConfig.
        run_dir: output folder (config.yaml, metrics.jsonl, checkpoints/, summary.json).
        log: callable taking one progress line.
    """

    def __init__(self, cfg, run_dir, log=print):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        runtime.setup(cfg.runtime)
        m, moe, t = cfg.model, cfg.moe, cfg.train
        self.domains = load_corpus(cfg.data, m.seq_len)
        self.model = build_model(cfg)
        self.optimizer = HybridEpsAdamW(self.model.trainable_params(), t.beta1, t.beta2, t.eps, t.expert_eps,
                                        t.weight_decay)
        self.tokens_per_step = t.batch_size * m.seq_len
        self.capacity = expert_capacity(self.tokens_per_step, moe.num_experts, moe.top_k, moe.capacity_factor,
                                        moe.min_capacity)
        self.eval_capacity = expert_capacity(self.tokens_per_step, moe.num_experts, moe.top_k,
                                             moe.eval_capacity_factor, moe.min_capacity)
        self.train_step = self._make_train_step()
        self.eval_step = self._make_eval_step()
        self.val = pipeline.val_windows(self.domains, m.seq_len)

    # --- compiled steps -------------------------------------------------------------------------
    def _make_train_step(self):
        model, optimizer, capacity = self.model, self.optimizer, self.capacity
        vocab, clip = self.cfg.model.vocab_size, self.cfg.train.grad_clip

        def forward(input_ids, labels, domain_ids):
            logits, aux_loss, z_loss, demand, kept = model(input_ids, domain_ids, capacity, True)
            lm_loss = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
            return lm_loss + aux_loss + z_loss, (lm_loss, aux_loss, z_loss, demand, kept)

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)

        def train_step(input_ids, labels, domain_ids, lr):
            (loss, (lm_loss, aux_loss, z_loss, demand, kept)), grads = grad_fn(input_ids, labels, domain_ids)
            grads, grad_norm = clip_by_global_norm(grads, clip)
            optimizer(grads, lr)
            return loss, lm_loss, aux_loss, z_loss, grad_norm, demand, kept

        return ms.jit(train_step) if self.cfg.runtime.mode == "graph" else train_step

    def _make_eval_step(self):
        model, capacity, vocab = self.model, self.eval_capacity, self.cfg.model.vocab_size

        def eval_step(input_ids, labels, domain_ids):
            logits = model(input_ids, domain_ids, capacity, False)[0]
            return ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="sum")

        return ms.jit(eval_step) if self.cfg.runtime.mode == "graph" else eval_step

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, max_batches=None):
        """Mean validation loss (nats per byte) over whole batches of the validation windows.

        Returns: (val_loss, val_bpb).
        """
        batch = self.cfg.train.batch_size
        inputs, labels, domains = self.val
        n_batches = len(inputs) // batch
        if n_batches == 0:
            raise ConfigError(f"train.batch_size = {batch}: larger than the {len(inputs)} validation windows")
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        total = 0.0
        for b in range(n_batches):
            rows = slice(b * batch, (b + 1) * batch)
            total += float(self.eval_step(Tensor(inputs[rows]), Tensor(labels[rows]), Tensor(domains[rows])).asnumpy())
        val_loss = total / (n_batches * batch * self.cfg.model.seq_len)
        return val_loss, val_loss / math.log(2)

    # --- training -------------------------------------------------------------------------------
    def train(self, resume=False):
        """Train to `train.steps`; returns the summary dict (also written to summary.json)."""
        cfg, t = self.cfg, self.cfg.train
        os.makedirs(self.run_dir, exist_ok=True)
        config_path = os.path.join(self.run_dir, "config.yaml")
        state = {"step": 0, "choices_total": 0, "kept_total": 0, "train_seconds": 0.0, "train_tokens": 0}
        if resume:
            state = self._resume(config_path)
        elif checkpoint.list_checkpoints(self.run_dir):
            last = checkpoint.list_checkpoints(self.run_dir)[-1][0]
            raise ConfigError(f"--out {self.run_dir}: already holds checkpoints (up to step {last}); pass --resume "
                              f"to continue that run or choose a new --out")
        cfg.save(config_path)
        metrics = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"),
                             keep_until_step=state["step"] if resume else None)
        batches = pipeline.train_batches(self.domains, cfg.model.seq_len, t.batch_size, cfg.runtime.seed,
                                         state["step"], t.steps, cfg.data.mixture)
        self.log(f"training {cfg.moe.router} router, {count_parameters(self.model)[0]:,} parameters, "
                 f"C={self.capacity} slots/expert, steps {state['step']}..{t.steps} -> {self.run_dir}")
        window_tokens, window_seconds = 0, 0.0
        for input_ids, labels, domain_ids in batches:
            step = state["step"]
            lr = learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.steps)
            began = time.perf_counter()
            out = self.train_step(Tensor(input_ids), Tensor(labels), Tensor(domain_ids), Tensor(lr, ms.float32))
            loss, lm_loss, aux_loss, z_loss, grad_norm, demand, kept = [o.asnumpy() for o in out]
            seconds = time.perf_counter() - began
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: loss is {loss}; lower train.lr or raise train.warmup_steps")
            state["step"] = step = step + 1
            state["choices_total"] += int(demand.sum())
            state["kept_total"] += int(kept.sum())
            if step > 1 or resume:  # the first step of a process includes graph compilation
                state["train_seconds"] += seconds
                state["train_tokens"] += self.tokens_per_step
                window_tokens += self.tokens_per_step
                window_seconds += seconds
            do_eval = step % t.eval_every == 0 or step == t.steps
            if step % t.log_every == 0 or do_eval:
                record = {"step": step, "loss": float(loss), "lm_loss": float(lm_loss), "aux_loss": float(aux_loss),
                          "z_loss": float(z_loss), "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": window_tokens / window_seconds if window_seconds else 0.0,
                          "layers": layer_records(demand, kept, self.capacity, cfg.model.hidden)}
                if do_eval:
                    record["val_loss"], record["val_bpb"] = self.evaluate(t.eval_batches)
                metrics.write(record)
                per_step = state["train_seconds"] * self.tokens_per_step / max(1, state["train_tokens"])
                self.log(progress_line(record, t.steps, per_step))
                window_tokens, window_seconds = 0, 0.0
            if step % t.checkpoint_every == 0 or step == t.steps:
                self._save(state)
        return self._finish(state)

    def _save(self, state):
        checkpoint.save(checkpoint.step_path(self.run_dir, state["step"]), [self.model, self.optimizer], state)
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for _, path in checkpoint.list_checkpoints(self.run_dir)[:-keep]:
                os.remove(path)

    def _resume(self, config_path):
        found = checkpoint.list_checkpoints(self.run_dir)
        if not found:
            raise checkpoint.CheckpointError(f"--resume: no checkpoints in {self.run_dir}/checkpoints")
        if os.path.exists(config_path):
            saved = RunConfig.from_yaml(config_path)
            for section in ("model", "moe", "data"):
                if getattr(saved, section) != getattr(self.cfg, section):
                    raise ConfigError(f"--resume: the {section} section differs from {config_path}; "
                                      f"resume with the run's own config")
        state = checkpoint.load(found[-1][1], [self.model, self.optimizer], STATE_KEYS)
        if state["step"] >= self.cfg.train.steps:
            raise ConfigError(f"train.steps = {self.cfg.train.steps}: the run already reached step {state['step']}; "
                              f"raise train.steps to continue")
        self.log(f"resumed from {found[-1][1]} at step {state['step']}")
        return state

    def _finish(self, state):
        cfg = self.cfg
        val_loss, val_bpb = self.evaluate()
        unigram = pipeline.unigram_bpb(self.domains)
        reference = expert_capacity(self.tokens_per_step, cfg.moe.num_experts, cfg.moe.top_k,
                                    REFERENCE_CAPACITY_FACTOR, 1)
        total, active = count_parameters(self.model, cfg.moe.top_k / cfg.moe.num_experts)
        summary = {
            "steps": state["step"], "val_loss": val_loss, "val_bpb": val_bpb, "unigram_bpb": unigram,
            "bpb_over_unigram": val_bpb / unigram,
            "tokens_per_s": state["train_tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0,
            "router": cfg.moe.router, "top_k": cfg.moe.top_k, "num_experts": cfg.moe.num_experts,
            "num_groups": cfg.moe.num_groups,
            "dropped_fraction": 1.0 - state["kept_total"] / state["choices_total"] if state["choices_total"] else 0.0,
            "inter_node_fraction": 0.0,
            "capacity": self.capacity, "capacity_ratio": self.capacity / reference,
            "params_total": total, "params_active": active,
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
        self.log(f"done: val_bpb {val_bpb:.3f} = {val_bpb / unigram:.3f} x unigram ({unigram:.3f}); "
                 f"dropped {summary['dropped_fraction']:.2%}; {summary['tokens_per_s']:,.0f} tokens/s")
        return summary


def count_parameters(model, expert_share=1.0):
    """(total, active) trainable parameter counts; active counts experts by `expert_share` (K / E)."""
    total = active = 0
    for p in model.trainable_params():
        n = int(np.prod(p.shape))
        total += n
        active += n * expert_share if is_expert_parameter(p.name) else n
    return total, int(active)


def progress_line(record, total_steps, seconds_per_step):
    """One human line: step, losses, lr, throughput, ETA (and validation when present)."""
    tps = record["tokens_per_s"]
    remaining = (total_steps - record["step"]) * seconds_per_step
    line = (f"step {record['step']:>5}/{total_steps}  loss {record['loss']:.4f}  lm {record['lm_loss']:.4f}  "
            f"aux {record['aux_loss']:.4f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s  eta {_clock(remaining)}")
    if "val_loss" in record:
        line += f"  | val_loss {record['val_loss']:.4f}  val_bpb {record['val_bpb']:.3f}"
    return line


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
