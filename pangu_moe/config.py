"""The run configuration: one tree of nested dataclasses; YAML is only its serialization.

`RunConfig{model, moe, parallel, train, data, runtime}`. Each field carries its help text and its
allowed range in the dataclass field metadata, so validation, `pangu-moe config --show` and the
docs read from one place. Every user error raises `ConfigError` with one line naming the dotted
path, the bad value and what is allowed.
"""
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import List

import yaml


EXCHANGE_BACKENDS = ("local", "simulated", "msrun_cpu", "hccl")  # parallel.dispatch, docs/architecture.md (Expert parallelism)
MULTI_PROCESS_BACKENDS = ("msrun_cpu", "hccl")  # one rank per process, started by msrun
CHECKPOINT_FORMATS = ("ckpt", "safetensors")  # runtime.checkpoint_format
# runtime.kernels: plain MindSpore, the custom kernels of the device, MindSpore's shipped Ascend MoE ops, or auto
KERNELS = ("reference", "custom", "ascend_builtin", "auto")
PRECISIONS = ("fp32", "fp16", "bf16")  # train.precision (pangu_moe/precision.py)


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: path, value, what is allowed."""


def _f(default, help, *, lo=None, hi=None, choices=None, lo_open=False, hi_open=False):
    """A config field with its help text and allowed values (`lo`/`hi` inclusive unless `lo_open`/`hi_open`)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "hi_open": hi_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    vocab_size: int = _f(256, "vocabulary size V (256 for the byte tokenizer)", lo=2)
    hidden: int = _f(128, "hidden size H", lo=1)
    num_heads: int = _f(2, "attention heads; must divide hidden", lo=1)
    num_dense_layers: int = _f(2, "dense blocks at the bottom, shared by all domains", lo=0)
    num_moe_layers: int = _f(2, "sparse (MoE) blocks above the dense blocks", lo=1)
    ffn_hidden: int = _f(512, "FFN hidden size F of the dense blocks and the query layer", lo=1)
    seq_len: int = _f(256, "tokens per sequence S", lo=2)
    init_std: float = _f(0.02, "std of the normal weight init", lo=0.0, lo_open=True)


SLOT_POLICIES = ("position", "probs", "random", "affinity", "none")


@dataclass
class TopKSection:
    jitter_eps: float = _f(0.0, "multiplicative router-input jitter U(1-eps, 1+eps), training only; "
                           "0 disables it", lo=0.0, hi=1.0)
    normalize_gates: bool = _f(True, "K>1: renormalise the K gates of a token to sum to 1, before capacity "
                               "dropping (GShard / lingvo)")
    init_std: float = _f(0.02, "std of the router weight init", lo=0.0, lo_open=True)
    score_function: str = _f("softmax", "softmax (over the group's experts) or sigmoid (per expert; K>1 gates "
                             "renormalised by normalize_gates); the choice is the top-K of the logits either way",
                             choices=("softmax", "sigmoid"))
    seq_aux_coeff: float = _f(0.0, "alpha of the sequence-level balance loss (DeepSeek-V3 form, per sequence, "
                              "training only, logged in aux_loss); 0 disables it", lo=0.0)
    scaling: float = _f(1.0, "top-k scaling factor multiplying every gate", lo=0.0, lo_open=True)


@dataclass
class RRESection:
    seed: int = _f(0, "seed of the token-id -> expert tables (per layer and group)", lo=0)


@dataclass
class LocMoESection:
    locality_coeff: float = _f(0.01, "mu of the locality loss. The default is what the rule written before the "
                               "locality study's replication picked (pangu_moe/studies/presets.py default_mu, seeds "
                               "1239-1243): the smallest mu whose per-rank arm moves at most half of Switch's "
                               "inter-node choices. There (domains by node, capacity factor 2.5, 120 steps x 5 seeds, "
                               "demo model) mu = 0.01 kept 0.22x Switch's inter-node choices (0.15x with "
                               "moe.aux_scope=global), with val bpb +0.045 +- 0.135: quality not resolved at this "
                               "scale. mu = 0.001, below the break-even of about 0.003, kept 0.85x "
                               "(docs/results/2026-12-07-locality-replication.md)", lo=0.0)
    locality_variant: str = _f("kl", "kl (KL to uniform over the node's experts, smoothed) or mass "
                               "(-log of the probability mass on the node's experts)", choices=("kl", "mass"))
    locality_smoothing: float = _f(1e-3, "kl variant: eps of the smoothed target (1 - eps) D_l + eps / E; it sets "
                                   "how much locality pays against the aux loss (the break-even mu scales with "
                                   "-log eps)", lo=0.0, hi=1.0, lo_open=True)
    bias: bool = _f(True, "learnable per-expert bias (epsilon_i of LocMoE Eq. 2)")


@dataclass
class LocMoEPlusSection:
    locality_coeff: float = _f(0.01, "mu of the locality loss (default as moe.locmoe.locality_coeff)", lo=0.0)
    locality_variant: str = _f("kl", "as moe.locmoe.locality_variant", choices=("kl", "mass"))
    locality_smoothing: float = _f(1e-3, "as moe.locmoe.locality_smoothing", lo=0.0, hi=1.0, lo_open=True)
    keep_rule: str = _f("hybrid", "which candidates an expert keeps: tcr (first C by position), ecr (top C by "
                        "affinity) or hybrid (tcr, then ecr after the switch)", choices=("tcr", "ecr", "hybrid"))
    switch_step: int = _f(0, "hybrid: switch to ecr at this step (0: only the concentration criterion)", lo=0)
    switch_ratio: float = _f(0.6, "hybrid: switch to ecr once the re-estimated capacity is at most this share "
                             "of the capacity-factor capacity (experts have become discriminative); "
                             "0 disables the criterion", lo=0.0, hi=1.0)
    score_threshold: float = _f(1.0, "K>1: a token keeps its first l choices, l the smallest with a "
                                "score sum >= threshold (1.0 keeps all K)", lo=0.0, hi=1.0, lo_open=True)
    gate_temperature: float = _f(1.0, "tau of the gate softmax(cos / tau) (cosines are in [-1, 1])",
                                 lo=0.0, lo_open=True)
    gate: str = _f("fixed", "fixed: the gate is softmax(cos / gate_temperature); learned: 1 / temperature is "
                   "trained (from 1 / gate_temperature), so the gate can sharpen as Switch's does (the paper gives "
                   "no gate)", choices=("fixed", "learned"))
    recompute_every: int = _f(50, "steps between capacity re-estimates (0: the capacity stays at its ceiling, "
                              "the moe.capacity_factor capacity); the buffers follow the re-estimated capacity "
                              "in buckets", lo=0)
    keep_share: float = _f(0.95, "capacity re-estimate (Corollary 6): the share of each expert's estimated "
                           "class-discriminative candidates the capacity must keep (pangu_moe/capacity_need.py)",
                           lo=0.0, hi=1.0, lo_open=True)
    ema: float = _f(0.0, "EMA weight of the previous capacity estimate (0: none)", lo=0.0, hi=1.0, hi_open=True)
    non_increasing: bool = _f(False, "never raise the capacity again (off: the estimate follows the features "
                              "both ways)")


@dataclass
class SinkhornSection:
    iterations: int = _f(30, "Sinkhorn iterations (fixed, so the graph is static)", lo=1)


@dataclass
class DeepSeekSection:
    bias_rate: float = _f(0.001, "gamma: per-step change of the selection bias (sign rule); 0 freezes it", lo=0.0)
    node_limit: int = _f(0, "M: a token's experts span at most M nodes of parallel.* (0: no limit)", lo=0)
    seq_aux_coeff: float = _f(0.0001, "alpha of the sequence-wise balance loss", lo=0.0)
    scaling: float = _f(1.0, "routed scaling factor multiplying the normalised gates", lo=0.0, lo_open=True)


@dataclass
class KoolSkipSection:
    baseline_decay: float = _f(0.9, "EMA decay of the REINFORCE baseline (the batch's mean LM loss)", lo=0.0, hi=1.0,
                               hi_open=True)


@dataclass
class MoEConfig:
    router: str = _f("topk", "level-2 router by its registered name (the README's router table; topk is Switch at "
                     "K=1, GShard at K=2). Its settings live in moe.<router> where it has any (routers without "
                     "an init setting of their own take moe.topk.init_std), and it checks its own rules")
    num_experts: int = _f(8, "experts E per MoE layer (all groups together)", lo=1)
    expert_hidden: int = _f(512, "expert FFN hidden size F", lo=1)
    top_k: int = _f(1, "choices K per token", lo=1)
    num_groups: int = _f(1, "level-1 expert groups G: domain d is routed to group d; 1 = plain router, "
                         "else must equal the number of data domains", lo=1)
    slot_policy: str = _f("position", "which choices an expert keeps when over capacity: position (first come), "
                          "probs (highest gate), random (uniform subset, RTS), affinity (highest router "
                          "affinity) or none (dropless: C = T)", choices=SLOT_POLICIES)
    capacity_factor: float = _f(1.25, "training capacity factor: C = ceil(K*T*factor/E)", lo=0.0, lo_open=True)
    eval_capacity_factor: float = _f(2.0, "capacity factor used for evaluation", lo=0.0, lo_open=True)
    min_capacity: int = _f(4, "lower bound on C (slots per expert per routing group)", lo=1)
    capacity_mode: str = _f("factor", "factor: C from capacity_factor; locmoe_bound: C frozen at the routers' "
                            "proposal measured on the first batch (LocMoE's lower bound; routers that propose one: "
                            "locmoe), floored at min_capacity",
                            choices=("factor", "locmoe_bound"))
    delta_quantile: float = _f(0.0, "locmoe_bound: quantile of the routed cosines taken as delta-hat (0 = minimum)",
                               lo=0.0, hi=0.5)
    aux_loss_coeff: float = _f(0.01, "alpha of the Switch load-balancing loss alpha*E*sum(f_i*P_i)", lo=0.0)
    aux_scope: str = _f("rank", "over which tokens the router losses take f and P: rank (each routing group's "
                        "own, averaged over ranks: a rank that localises pays up to E_g/E_node times alpha) or "
                        "global (all ranks' tokens: balance of the whole layer, as one big batch; with one rank per "
                        "process the expert counts are all-reduced each step, one [G, E_g+1] vector a layer)",
                        choices=("rank", "global"))
    z_loss_coeff: float = _f(0.001, "coefficient of the router z-loss mean(logsumexp(logits)^2)", lo=0.0)
    topk: TopKSection = field(default_factory=TopKSection)
    rre: RRESection = field(default_factory=RRESection)
    locmoe: LocMoESection = field(default_factory=LocMoESection)
    locmoe_plus: LocMoEPlusSection = field(default_factory=LocMoEPlusSection)
    sinkhorn: SinkhornSection = field(default_factory=SinkhornSection)
    deepseek: DeepSeekSection = field(default_factory=DeepSeekSection)
    kool_skip: KoolSkipSection = field(default_factory=KoolSkipSection)
    router_dtype: str = _f("fp32", "dtype of the router's input and of the linear routers' logits matmul: fp32 "
                           "(Switch's selective precision) or low (train.precision's dtype; an ablation). Scores, "
                           "top-k, capacity and the router losses are fp32 either way", choices=("fp32", "low"))


@dataclass
class ParallelConfig:
    dispatch: str = _f("local", "exchange backend (docs/architecture.md, Expert parallelism): local (one process, one buffer over all ranks' "
                       "slots), simulated (one process, W ranks with send buffers and a transposing exchange), "
                       "msrun_cpu (one CPU process per rank under msrun), hccl (Ascend AlltoAll). Each of the "
                       "W = nodes x devices_per_node ranks holds batch_size/W sequences and routes them as its own "
                       "group with capacity C",
                       choices=EXCHANGE_BACKENDS)
    exchange: str = _f("flat", "flat (one world all-to-all) or hierarchical (inter-node stage among same-local-rank "
                       "peers, then intra-node; the same result, fewer inter-node messages); not for local",
                       choices=("flat", "hierarchical"))
    exchange_layout: str = _f("ragged", "ragged (only the kept rows travel: each (source, destination) block's "
                              "occupancy first, then its occupied rows on an uneven all-to-all, AlltoAllV on hccl) or "
                              "padded (every slot of the [W, E_loc, C, H] send buffer travels); not for local",
                              choices=("ragged", "padded"))
    nodes: int = _f(1, "nodes N", lo=1)
    devices_per_node: int = _f(1, "devices per node D", lo=1)
    intra_node_gbps: float = _f(18.3, "modelled exchange time (metrics modelled_exchange_ms): one-direction "
                                "bandwidth of a device's intra-node links, GB/s (default: HCCL's internal figure for "
                                "Ascend 910B HCCS, docs/architecture.md)", lo=0.0, lo_open=True)
    inter_node_gbps: float = _f(20.0, "modelled exchange time: one-direction bandwidth of a device's inter-node "
                                "link, GB/s (default: HCCL's internal figure for 910B RoCE, 25 GB/s x 0.8)", lo=0.0,
                                lo_open=True)
    intra_node_latency_us: float = _f(10.0, "modelled exchange time: latency of one intra-node message, microseconds "
                                      "(assumed: no published figure)", lo=0.0)
    inter_node_latency_us: float = _f(60.0, "modelled exchange time: latency of one inter-node message, microseconds "
                                      "(HCCL's internal static latency for inter-server algorithm choice)", lo=0.0)
    placement: List[int] = _f([], "expert placement of every MoE layer: the rank hosting each of the moe.num_experts "
                              "experts, each rank E / W of them ([]: expert e on rank e // E_loc); moves which rank "
                              "computes an expert, never what is computed (docs/architecture.md, Expert placement)")
    placement_every: int = _f(0, "steps between re-placements of the experts from the kept choices per (source node, "
                              "expert) since the last one, each move paying for itself over the next placement_every "
                              "steps (0: never)", lo=0)
    placement_hysteresis: float = _f(1.0, "a move must save more than this many times the bytes it sends (the "
                                     "expert's weights and Adam moments): 0 moves for any gain, above 1 moves "
                                     "reluctantly", lo=0.0)
    grad_bucket_mb: float = _f(25.0, "multi-process backends: the shared gradients are all-reduced in buckets of at "
                               "most this many MB, one collective a bucket", lo=0.0, lo_open=True)


@dataclass
class TrainConfig:
    steps: int = _f(400, "optimizer steps", lo=1)
    batch_size: int = _f(16, "sequences per step B", lo=1)
    lr: float = _f(3e-3, "peak learning rate", lo=0.0, lo_open=True)
    min_lr: float = _f(3e-4, "final learning rate of the cosine decay", lo=0.0)
    warmup_steps: int = _f(30, "linear warmup steps", lo=0)
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not applied to norms and biases)", lo=0.0)
    beta1: float = _f(0.9, "Adam beta1", lo=0.0, hi=1.0, hi_open=True)
    beta2: float = _f(0.95, "Adam beta2", lo=0.0, hi=1.0, hi_open=True)
    eps: float = _f(1e-8, "Adam epsilon of the dense parameters", lo=0.0, lo_open=True)
    expert_eps: float = _f(1e-20, "Adam epsilon of the expert parameters (PanGu-Sigma hybrid-eps Adam)",
                           lo=0.0, lo_open=True)
    fused_optimizer: bool = _f(False, "AdamW through MindSpore's fused AdamWeightDecay kernel (one call a parameter) "
                               "instead of elementwise ops; the same update up to rounding")
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 disables clipping", lo=0.0)
    log_every: int = _f(10, "steps between metrics records", lo=1)
    eval_every: int = _f(100, "steps between evaluations (and one at the end)", lo=1)
    eval_batches: int = _f(8, "validation batches per evaluation", lo=1)
    checkpoint_every: int = _f(100, "steps between checkpoints (and one at the end)", lo=1)
    keep_checkpoints: int = _f(2, "newest checkpoints kept in RUN_DIR/checkpoints; 0 keeps all", lo=0)
    max_skipped_steps: int = _f(5, "a step with a non-finite loss or gradient norm is skipped (no update, counted "
                                "as skipped_steps in metrics.jsonl); this many in a row abort the run (fp16 steps "
                                "whose loss scale overflowed count only once the scale is down to 1)", lo=1)
    precision: str = _f("fp32", "compute dtype of matmuls, dispatch buffers and the exchange: fp32, fp16 (with "
                        "dynamic loss scaling) or bf16 (no loss scaling; on CPU, which has no bf16 matmul, fp32 "
                        "matmuls whose operands are rounded to bf16: bf16's rounding, not its speed or memory). "
                        "Weights, optimizer state, layer norms, the residual stream, routers and losses stay fp32",
                        choices=PRECISIONS)
    loss_scale: float = _f(65536.0, "fp16: initial loss scale (a power of 2)", lo=1.0)
    loss_scale_window: int = _f(1000, "fp16: applied steps in a row (no overflow) before the loss scale doubles, up "
                                "to 2^24", lo=1)
    loss_scale_backoff: float = _f(0.5, "fp16: factor applied to the loss scale after an overflow", lo=0.0,
                                   hi=1.0, lo_open=True, hi_open=True)


@dataclass
class DataConfig:
    source: str = _f("demo", "demo (text shipped with Python), jsonl (lines {text, domain}), folders "
                     "(one sub-folder of .txt files per domain), all read into memory as bytes; or prepared (the "
                     "MindRecord shards of pangu-moe prepare-data, streamed, with their tokenizer)",
                     choices=("demo", "jsonl", "folders", "prepared"))
    path: str = _f("", "file (jsonl) or folder (folders, prepared); unused for demo")
    domains: List[str] = _f(["prose", "code"], "domain names; the domain id is the position in this list")
    mixture: str = _f("uniform", "how training samples pick their domain: uniform (sample i has domain i mod D, "
                      "so each batch holds every domain equally often), bytes (random, in proportion to each "
                      "domain's text) or by_node (node n's ranks hold domain n mod D, as PanGu-Sigma places "
                      "domains with their experts)",
                      choices=("uniform", "bytes", "by_node"))
    val_fraction: float = _f(0.05, "share of each domain's documents held out for validation",
                             lo=0.0, hi=0.5, lo_open=True)
    max_bytes_per_domain: int = _f(3_000_000, "cap on the bytes read per domain (in-memory sources)", lo=1)
    max_val_windows: int = _f(1024, "prepared: validation windows read per domain (the first ones)", lo=1)
    tokenizer: str = _f("bytes", "in-memory sources (demo, jsonl, folders): bytes, or bpe:<V>, a byte-level BPE of V "
                        "ids trained on the training split when the run starts and kept in the run directory; not "
                        "used with data.source=prepared, whose corpus carries its own tokenizer")


@dataclass
class RuntimeConfig:
    device: str = _f("CPU", "MindSpore device target", choices=("CPU", "Ascend"))
    mode: str = _f("graph", "graph (one compiled train step) or pynative", choices=("graph", "pynative"))
    seed: int = _f(1234, "seed of weights, data order and routing tables", lo=0)
    kernels: str = _f("auto", "MoE gating/dispatch ops: reference (plain MindSpore), custom (C++ kernels on "
                      "CPU, Ascend C on Ascend), ascend_builtin (MindSpore's shipped Ascend MoE ops; Ascend, "
                      "train.precision=bf16, the ragged exchange under expert parallelism, not expert_choice) or auto (ascend_builtin "
                      "where it can run, else reference, the faster on CPU); kernels/README.md", choices=KERNELS)
    checkpoint_format: str = _f("ckpt", "checkpoint files: ckpt (MindSpore's) or safetensors", choices=CHECKPOINT_FORMATS)
    profile_steps: List[int] = _f([], "[start, end]: MindSpore's profiler around training steps start..end-1 (0-based), "
                                  "output in RUN_DIR/profile; [] (default) profiles nothing")
    async_checkpoint: bool = _f(False, "write checkpoints in a background thread while training goes on (a copy of "
                                "the weights is taken first); one-process backends only")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self):
        """Cross-section checks; field ranges were checked when the tree was built."""
        m, moe, data = self.model, self.moe, self.data
        _require(m.hidden % m.num_heads == 0, "model.num_heads", m.num_heads,
                 f"a divisor of model.hidden={m.hidden}")
        _require(moe.num_experts % moe.num_groups == 0, "moe.num_groups", moe.num_groups,
                 f"a divisor of moe.num_experts={moe.num_experts}")
        _require(moe.num_groups in (1, len(data.domains)), "moe.num_groups", moe.num_groups,
                 f"1 or the number of data.domains ({len(data.domains)})")
        per_group = moe.num_experts // moe.num_groups
        _require(moe.top_k <= per_group, "moe.top_k", moe.top_k,
                 f"at most the experts per group ({per_group})")
        world = self.parallel.nodes * self.parallel.devices_per_node
        _require(moe.num_experts % world == 0 or world % moe.num_experts == 0, "parallel.devices_per_node",
                 self.parallel.devices_per_node, f"such that nodes x devices_per_node divides or is a multiple of "
                 f"moe.num_experts={moe.num_experts}")
        _require(self.train.batch_size % world == 0, "train.batch_size", self.train.batch_size,
                 f"a multiple of nodes x devices_per_node = {world} (each rank holds whole sequences)")
        p = self.parallel
        _require(p.dispatch == "local" or moe.num_experts % world == 0, "parallel.dispatch", p.dispatch,
                 f"local when W = {world} ranks does not divide moe.num_experts={moe.num_experts} (expert "
                 f"parallelism shards E / W experts per rank)")
        _require(p.dispatch != "local" or p.exchange == "flat", "parallel.exchange", p.exchange,
                 "flat with parallel.dispatch=local (it has no exchange)")
        _require(p.dispatch != "local" or p.exchange_layout == "ragged", "parallel.exchange_layout", p.exchange_layout,
                 "ragged (the default) with parallel.dispatch=local (it has no exchange)")
        _require(p.dispatch != "hccl" or p.exchange == "flat" or p.exchange_layout == "padded",
                 "parallel.exchange_layout", p.exchange_layout, "padded with parallel.exchange=hierarchical on hccl "
                 "(the ragged hierarchical exchange has no AlltoAllV stages there yet; use parallel.exchange=flat)")
        _require(p.dispatch != "hccl" or self.runtime.device == "Ascend", "runtime.device", self.runtime.device,
                 "Ascend for parallel.dispatch=hccl")
        _require(p.dispatch != "msrun_cpu" or self.runtime.device == "CPU", "runtime.device", self.runtime.device,
                 "CPU for parallel.dispatch=msrun_cpu")
        placed = bool(p.placement) or p.placement_every > 0
        key = "parallel.placement_every" if p.placement_every else "parallel.placement"
        value = p.placement_every or p.placement
        _require(not placed or moe.num_experts % world == 0, key, value,
                 f"{'0' if p.placement_every else '[]'} when W = {world} ranks does not divide moe.num_experts="
                 f"{moe.num_experts} (a placement puts E / W experts on each rank)")
        profile = self.runtime.profile_steps
        _require(not profile or (len(profile) == 2 and 0 <= profile[0] < profile[1] <= self.train.steps),
                 "runtime.profile_steps", profile, f"[] or [start, end] with 0 <= start < end <= train.steps="
                 f"{self.train.steps}")
        one_rank = p.dispatch in MULTI_PROCESS_BACKENDS
        _require(not one_rank or not self.runtime.async_checkpoint, "runtime.async_checkpoint",
                 self.runtime.async_checkpoint, f"false with parallel.dispatch={p.dispatch} (the ranks' checkpoint "
                 f"barrier would be a collective from a second thread)")
        _require(not one_rank or moe.capacity_mode == "factor", "moe.capacity_mode", moe.capacity_mode,
                 f"factor with parallel.dispatch={p.dispatch} (the routers' capacity proposals run the whole model "
                 f"in one process; use simulated)")
        # The routers' own rules and the kernels' are checked above the config (pangu_moe/checks.py).
        _require(moe.capacity_mode == "factor" or moe.slot_policy != "none", "moe.capacity_mode", moe.capacity_mode,
                 "factor with moe.slot_policy = none (dropless sets C = T)")
        _require(len(data.domains) > 0 and len(set(data.domains)) == len(data.domains), "data.domains",
                 data.domains, "a non-empty list of distinct names")
        _require(data.mixture != "uniform" or self.train.batch_size % len(data.domains) == 0, "train.batch_size",
                 self.train.batch_size, f"a multiple of the {len(data.domains)} data.domains for data.mixture=uniform")
        _require(data.mixture != "by_node" or self.parallel.nodes % len(data.domains) == 0, "parallel.nodes",
                 self.parallel.nodes, f"a multiple of the {len(data.domains)} data.domains for data.mixture=by_node")
        _require(data.source == "demo" or data.path != "", "data.path", data.path,
                 f"a path (data.source={data.source} reads it)")
        _require(data.source != "demo" or data.domains == ["prose", "code"], "data.domains", data.domains,
                 "[prose, code] for data.source=demo")
        _require(m.vocab_size >= 256, "model.vocab_size", m.vocab_size, ">= 256 (byte tokenizer)")
        bpe = bpe_vocab_size(data.tokenizer)  # checked whatever the source; a prepared corpus brings its own
        _require(data.source == "prepared" or m.vocab_size >= bpe, "model.vocab_size", m.vocab_size,
                 f">= {bpe}, the vocabulary of data.tokenizer={data.tokenizer}")
        _require(self.train.min_lr <= self.train.lr, "train.min_lr", self.train.min_lr,
                 f"<= train.lr={self.train.lr}")
        _require(moe.router_dtype == "fp32" or self.train.precision != "fp32", "moe.router_dtype", moe.router_dtype,
                 "fp32 with train.precision=fp32 (low means the fp16 or bf16 of train.precision)")
        _require(math.log2(self.train.loss_scale).is_integer(), "train.loss_scale", self.train.loss_scale,
                 "a power of 2 (so scaling and unscaling the gradients is exact)")
        _require(math.log2(self.train.loss_scale_backoff).is_integer(), "train.loss_scale_backoff",
                 self.train.loss_scale_backoff, "a power of 2 below 1, e.g. 0.5 (the scale stays a power of 2)")
        _require(self.train.warmup_steps <= self.train.steps, "train.warmup_steps", self.train.warmup_steps,
                 f"<= train.steps={self.train.steps}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d, overrides=()):
        """Build and validate from a nested dict, then apply `overrides` ("dotted.key=value" strings)."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"config: the top level must be a mapping, got {type(d).__name__}")
        d = _sections_copy(d)
        for item in overrides:
            _apply_override(d, item)
        try:
            return _build(cls, d, "").validate()
        except ConfigError as e:
            domains = d.get("data", {}).get("domains") if isinstance(d.get("data"), dict) else None
            if not str(e).startswith(DOMAIN_TIED) or not isinstance(domains, list):
                raise
            try:
                fit = fit_domains(d, domains)
            except ConfigError:  # a field of another kind is wrong too: the first error is the one to fix
                fit = ""
            raise ConfigError(f"{e}" + (f"; with {len(domains)} data.domains these settings work together: "
                                        f"{fit}" if fit else "")) from None

    @classmethod
    def from_yaml(cls, path, overrides=()):
        """The config of YAML file `path`, or of the shipped config it names when it is not a file (`configs.packaged`:
        `smoke_cpu`, `configs/demo_cpu.yaml`, ...), with "section.key=value" `overrides`."""
        from pangu_moe import configs
        shipped = None if os.path.exists(path) else configs.packaged(path)
        path = shipped or path
        try:
            with open(path, encoding="utf-8") as fh:
                d = yaml.safe_load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found (shipped configs, usable by name: "
                              f"{', '.join(configs.packaged_names())})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path}: not valid YAML ({one_line(e)})") from None
        if d is None:  # an empty file would silently train the defaults, which the user did not choose
            raise ConfigError(f"config file {path}: empty; write the settings to change (pangu-moe config --fields "
                              f"lists them), or start from a shipped config: {', '.join(configs.packaged_names())}")
        return cls.from_dict(d, overrides)

    def save(self, path):
        """Write the YAML atomically: other ranks of a multi-process run may be reading the old file."""
        tmp = os.fspath(path) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_yaml())
        os.replace(tmp, path)


# The fields a change in the number of data.domains can break (RunConfig.validate), named together by `fit_domains`.
DOMAIN_TIED = ("data.domains", "moe.num_groups", "moe.num_experts", "moe.top_k", "train.batch_size",
               "parallel.nodes")


def fit_domains(d, domains, tries=64):
    """--set flags (one string) that make config dict `d` valid for `domains`, changing only `DOMAIN_TIED` fields
    and each as little as it can: data.domains; moe.num_groups kept at 1, else one group per domain; the fewest
    experts at or above moe.num_experts that the groups and ranks divide; the smallest train.batch_size and
    parallel.nodes at or above the config's that the mixture accepts. "" when `tries` steps of each find none."""
    base = _sections_copy(d)
    base.setdefault("data", {})["domains"] = list(domains)
    current = _build(RunConfig, {k: v for k, v in d.items() if k in ("moe", "train", "parallel")}, "")
    groups = 1 if current.moe.num_groups == 1 else len(domains)
    for extra in range(tries):
        for batch_extra in range(tries):
            fields = {"moe.num_groups": groups, "moe.num_experts": current.moe.num_experts + extra,
                      "train.batch_size": current.train.batch_size + batch_extra,
                      "parallel.nodes": _next_multiple(current.parallel.nodes, len(domains))
                      if d.get("data", {}).get("mixture") == "by_node" else current.parallel.nodes}
            trial = _sections_copy(base)
            for path, value in fields.items():
                section, key = path.split(".")
                trial.setdefault(section, {})[key] = value
            try:
                _build(RunConfig, trial, "").validate()
            except ConfigError:
                continue
            changed = {path: value for path, value in fields.items()
                       if value != getattr(getattr(current, path.split(".")[0]), path.split(".")[1])}
            return " ".join([f"--set 'data.domains=[{','.join(domains)}]'"] +
                            [f"--set {path}={value}" for path, value in changed.items()])
    return ""


def _sections_copy(d):
    """A copy of config dict `d` whose sections can be changed without touching `d`'s."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _next_multiple(value, of):
    return -(-value // of) * of


def one_line(e):
    """An exception's message on one line, whole (a cut message once ended at "at", before the position)."""
    return " ".join(str(e).split())


def bpe_vocab_size(spec):
    """`data.tokenizer` -> the BPE's vocabulary size V, or 0 for bytes; ConfigError naming the field otherwise."""
    if spec == "bytes":
        return 0
    size = spec[4:] if spec.startswith("bpe:") else ""
    _require(size.isdigit() and int(size) > 256, "data.tokenizer", spec,
             "bytes or bpe:<V> with V > 256 (e.g. bpe:1024)")
    return int(size)


def _require(ok, path, value, allowed):
    if not ok:
        raise ConfigError(f"{path} = {value!r}: must be {allowed}")


def _apply_override(d, item):
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {key!r}: must be a dotted path section.key, e.g. train.steps or "
                          f"moe.locmoe.locality_coeff")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    for depth, name in enumerate(parts[:-1]):
        section = d.get(name)
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} = {section!r}: must be a mapping")
        d[name] = section = dict(section)
        d = section
    d[parts[-1]] = value


def _check_type(path, value, tp):
    origin = typing.get_origin(tp)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} = {value!r}: must be a list of {item_tp.__name__}")
        return [_check_type(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r}: must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (an exponent without a dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r}: must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{path} = {value!r}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} = {value!r}: must be a string")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _check_range(path, value, meta):
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path} = {value!r}: must be one of {', '.join(choices)}")
    bounds = []
    if lo is not None:
        bounds.append(f"> {lo}" if meta.get("lo_open") else f">= {lo}")
    if hi is not None:
        bounds.append(f"< {hi}" if meta.get("hi_open") else f"<= {hi}")
    too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    too_high = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if too_low or too_high:
        raise ConfigError(f"{path} = {value!r}: must be {' and '.join(bounds)}")


def _build(cls, d, prefix):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} = {d!r}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in d:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            continue
        path = prefix + name
        if dataclasses.is_dataclass(f.type):
            kwargs[name] = _build(f.type, d[name] if d[name] is not None else {}, path + ".")
        else:
            value = _check_type(path, d[name], f.type)
            if f.type is not list and typing.get_origin(f.type) is None:
                _check_range(path, value, f.metadata)
            kwargs[name] = value
    return cls(**kwargs)


def describe(cls=RunConfig, prefix=""):
    """Yield (dotted path, default, help) for every leaf field, for `config --show` and the docs."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield from describe(f.type, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, default, f.metadata.get("help", "")


def fields_markdown():
    """docs/configuration.md: every field by section, with its default and meaning (`pangu-moe config --fields
    --markdown` prints it; a test keeps the page current)."""
    lines = ["# Configuration", "",
             "Generated by `pangu-moe config --fields --markdown` from the config's own field definitions "
             "(`pangu_moe/config.py`); do not edit by hand. A run's YAML holds any subset of these keys; "
             "`--set section.key=value` overrides one (a list: `--set 'data.domains=[en,zh,code]'`, quoted for "
             "the shell). Unknown keys, wrong types and values out of range are refused with one line naming "
             "the key, the value and what is allowed."]
    section = None
    for path, default, text in describe():
        head = path.rsplit(".", 1)[0]
        if head != section:
            section = head
            lines += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        lines.append(f"| `{path}` | `{default!r}` | {text.replace('|', '/')} |")
    return "\n".join(lines)
