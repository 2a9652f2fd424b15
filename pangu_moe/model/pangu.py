"""PanguModel: embeddings -> dense blocks -> MoE blocks -> query layer -> tied LM head."""
import dataclasses
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.checks import check, initial_slots
from pangu_moe.config import MULTI_PROCESS_BACKENDS
from pangu_moe.dispatch.collectives import SumOverRanks
from pangu_moe.dispatch.compact_exchange import CompactExchange
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.dispatch.exchange import Exchange
from pangu_moe.dispatch.placement import rows_after_move
from pangu_moe.dispatch.ragged import RaggedExchange
from pangu_moe.dispatch.topology import Topology
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.attention import Attention, causal_mask
from pangu_moe.model.block import DenseBlock, MoEBlock, QueryLayer
from pangu_moe.model.mlp import DenseMLP
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.ops import run_kernel_backend
from pangu_moe.ops.shipped import CompactDispatcher
from pangu_moe.precision import compute_form, operand
from pangu_moe.routing.registry import build_router


class PanguModel(nn.Cell):
    """PanGu-Σ-style decoder.

    Every token carries a domain id; level-1 routing sends it to group `domain_id` (or group 0 when
    `moe.num_groups == 1`).

    Args:
        model_cfg: `config.ModelConfig`; moe_cfg: `config.MoEConfig`.
        topology: `dispatch.topology.Topology` read by locality-aware routers (default: one device).
        backend: `parallel.dispatch`; exchange: `parallel.exchange`; rank: this process's world rank
            (multi-process backends hold only that rank's experts and tokens).
        exchange_layout: `parallel.exchange_layout` (ragged or padded).
        kernels: an `ops.KERNEL_BACKENDS` name (`ops.run_kernel_backend` of the run's config).
        noise_tokens: tokens of one routing group in training: routers then take their training noise from
            buffers that `feed_noise` fills each step (`Router.enable_fed_noise`); None keeps MindSpore's
            stateful random ops.
        placement: None (no expert placement) or the slot map [E] every MoE layer starts from
            (`dispatch.placement`; `MoELayer`'s placement); `topology.expert_slots` must equal it.
    """

    def __init__(self, model_cfg, moe_cfg, topology=None, backend="local", exchange="flat", rank=0,
                 kernels="reference", noise_tokens=None, exchange_layout="ragged", placement=None):
        super().__init__()
        m = model_cfg
        topology = topology or Topology(1, 1, moe_cfg.num_experts)
        self.model_cfg, self.moe_cfg = model_cfg, moe_cfg
        num_layers = m.num_dense_layers + m.num_moe_layers + 1
        out_std = m.init_std / math.sqrt(2 * num_layers)
        self.num_groups = moe_cfg.num_groups
        self.embedding = Parameter(initializer(Normal(m.init_std), (m.vocab_size, m.hidden), ms.float32),
                                   name="embedding")
        self.position_embedding = Parameter(initializer(Normal(m.init_std), (m.seq_len, m.hidden), ms.float32),
                                            name="position_embedding")
        self.query_embedding = Parameter(initializer(Normal(m.init_std), (m.seq_len, m.hidden), ms.float32),
                                         name="query_embedding")
        self.dense_blocks = nn.CellList([DenseBlock(m.hidden, m.num_heads, m.ffn_hidden, m.init_std, out_std)
                                         for _ in range(m.num_dense_layers)])
        self.moe_blocks = nn.CellList([
            MoEBlock(m.hidden, m.num_heads,
                     build_moe_layer(m, moe_cfg, layer, out_std, topology, backend, exchange, rank, kernels,
                                     noise_tokens, exchange_layout, placement),
                     m.init_std,
                     out_std)
            for layer in range(m.num_moe_layers)])
        self.query_layer = QueryLayer(m.hidden, m.num_heads, m.ffn_hidden, m.init_std, out_std)
        self.ln_f = nn.LayerNorm((m.hidden,))
        self.mask = causal_mask(m.seq_len)
        self.compute_dtype, self.bf16_operands = ms.float32, False
        self.precision = ("fp32", "fp32", "CPU")  # the arguments of `use_precision`

    def use_precision(self, precision, router_dtype="fp32", device="CPU"):
        """Run matmuls, dispatch buffers and the exchange in `precision`'s form on `device` (`train.precision`,
        `precision.compute_form`), and the routers' input and linear logits in it too if `router_dtype` is "low"
        (`moe.router_dtype`). Weights, layer norms, the residual stream and every loss stay fp32. Call before the
        first (compiled) step.
        """
        dtype, bf16_operands = compute_form(precision, device)
        self.compute_dtype, self.bf16_operands = dtype, bf16_operands
        self.precision = (precision, router_dtype, device)
        for _, cell in self.cells_and_names():
            if isinstance(cell, (Attention, DenseMLP, MoELayer, GroupedExperts)):
                cell.compute_dtype, cell.bf16_operands = dtype, bf16_operands
            if isinstance(cell, MoELayer) and router_dtype == "low":
                cell.router_dtype = dtype
                cell.router.logits_dtype, cell.router.bf16_operands = dtype, bf16_operands

    def construct(self, token_ids, domain_ids, capacity, training=False):
        """Forward pass.

        Args:
            token_ids: [B, S] int32; domain_ids: [B, S] int32 in [0, num_domains).
            capacity: python int C per expert per routing group (B*S tokens); training: python bool.
        Returns:
            logits [B, S, V] fp32, losses [3] fp32 (router losses summed over MoE layers, named by
            `routing.base.LOSS_NAMES`),
            tokens_per_expert [L_moe, W, E] int32, kept_per_expert [L_moe, W, E] int32 (W ranks of the
            topology, each holding B/W whole sequences),
            policy_terms [L_moe, B*S] fp32: each MoE layer's router input to its `objective`
            (`Router.combine`; zeros for most routers), read by `router_objective`,
            inter_rows [L_moe, W] int32: the rows each rank's dispatch sent to other nodes (`MoELayer.apply`).
        """
        s = token_ids.shape[1]
        mask = self.mask[:s, :s]
        group_ids = self._group_ids(domain_ids)
        h = self._dense_trunk(token_ids, mask)
        losses = ops.zeros((3,), ms.float32)
        tokens_per_expert, kept_per_expert, policy_terms, inter_rows = (), (), (), ()
        for block in self.moe_blocks:
            h, layer_losses, demand, kept, policy_term, crossing = block(h, token_ids, group_ids, mask, capacity,
                                                                         training)
            losses = losses + layer_losses
            tokens_per_expert += (demand,)
            kept_per_expert += (kept,)
            policy_terms += (policy_term,)
            inter_rows += (crossing,)
        logits = self._head(h, mask)
        return (logits, losses, ops.stack(tokens_per_expert), ops.stack(kept_per_expert), ops.stack(policy_terms),
                ops.stack(inter_rows))

    def router_objective(self, token_loss, policy_terms):
        """The routers' extra training-loss terms (`Router.objective`) summed, or None if no router has one.

        Args: token_loss [B*S] fp32 per-token LM loss; policy_terms [L_moe, B*S] fp32 from `construct`.
        """
        total = None
        for i, block in enumerate(self.moe_blocks):
            term = block.moe.router.objective(token_loss, policy_terms[i])
            if term is not None:
                total = term if total is None else total + term
        return total

    def update_router_state(self, lm_loss, applied):
        """Every router's `update_state` after a training step's update (inside the compiled step)."""
        for block in self.moe_blocks:
            block.moe.router.update_state(lm_loss, applied)

    def _head(self, h, mask):
        """Query layer, final LayerNorm and the tied LM head: h [B, S, H] -> logits [B, S, V] fp32."""
        return self.logits(self.query_layer(h, self.query_embedding[:h.shape[1]], mask))

    def logits(self, h):
        """The final LayerNorm and the tied LM head: h [B, S, H] -> logits [B, S, V] fp32."""
        dt, bf16 = self.compute_dtype, self.bf16_operands
        return ops.matmul(operand(self.ln_f(h), dt, bf16), operand(self.embedding.T, dt, bf16)).astype(
            ms.float32)  # (B, S, V)

    def feed_noise(self, rng):
        """Refill every router's training-noise buffers from numpy Generator `rng` (before a training step)."""
        for block in self.moe_blocks:
            block.moe.router.feed_noise(rng)

    def _group_ids(self, domain_ids):
        """Level 1: domain d goes to group d, or everything to group 0 with one group. [B, S] int32."""
        return domain_ids if self.num_groups > 1 else ops.zeros_like(domain_ids)

    def _dense_trunk(self, token_ids, mask):
        """Embeddings and dense blocks: token_ids [B, S] int32 -> h [B, S, H]."""
        h = ops.gather(self.embedding, token_ids, 0) + self.position_embedding[:token_ids.shape[1]]
        for block in self.dense_blocks:
            h = block(h, mask)
        return h

    def forward_traced(self, token_ids, domain_ids, capacity):
        """Evaluation forward that keeps every MoE layer's router input and routing (host-side probes in
        PyNative; `pangu-moe generate --trace` under `ms.jit`).

        Args: as `construct` (evaluation mode).
        Returns: logits [B, S, V] fp32, and a tuple over MoE layers of (x [T, H] fp32, token_ids [T] int32,
            group_ids [T] int32, routing): `routing` is `MoELayer.route`'s tuple (`routing.base.Routing`
            fields: expert_index [T, K] int32, keep [T, K] bool, ...), the routing this forward applied.
        """
        s = token_ids.shape[1]
        mask = self.mask[:s, :s]
        h = self._dense_trunk(token_ids, mask)
        token_ids, group_ids = token_ids.reshape(-1), self._group_ids(domain_ids).reshape(-1)  # (T,) <- (B, S)
        layers = ()
        for block in self.moe_blocks:
            h = block.attend(h, mask)
            x = block.router_input(h)
            routing = block.moe.route(x, token_ids, group_ids, capacity, False)
            h = h + block.moe.apply(x, routing, capacity)[0].reshape(h.shape)  # (B, S, H) <- (T, H)
            layers += ((x, token_ids, group_ids, routing),)
        return self._head(h, mask), layers

    def moe_inputs(self, token_ids, domain_ids, capacity):
        """The router input of every MoE layer, for host-side probes (see `forward_traced`).

        Returns: list of L_moe tuples (x [T, H] fp32, token_ids [T] int32, group_ids [T] int32).
        """
        return [layer[:3] for layer in self.forward_traced(token_ids, domain_ids, capacity)[1]]


def build_moe_layer(model_cfg, moe_cfg, layer, out_std, topology, backend="local", exchange="flat", rank=0,
                    kernels="reference", noise_tokens=None, exchange_layout="ragged", placement=None):
    """One MoE layer from the config (router by name, see `routing.registry`).

    `local` and `simulated` hold all W ranks in this process; `msrun_cpu` and `hccl` hold rank `rank`
    only, with its E_loc = E / W experts. `kernels` (an `ops.KERNEL_BACKENDS` name) runs the dispatch
    ops, and the gating of the routers that support the fused op (`Router.use_kernels`). With a `placement`
    slot map [E] the experts' weights are drawn as without one, then put in their slots (`MoELayer`).
    """
    router = build_router(model_cfg, moe_cfg, layer, topology)
    router.use_kernels(kernels)
    if placement is not None:
        router.follow_placement()
    if noise_tokens:
        router.enable_fed_noise(topology.world_size, noise_tokens)
    num_experts, world = moe_cfg.num_experts, topology.world_size
    one_rank = backend in MULTI_PROCESS_BACKENDS
    if one_rank and moe_cfg.aux_scope == "global" and world > 1:
        router.sum_counts_over_ranks(SumOverRanks())
    held, first = (1, rank) if one_rank else (world, 0)
    rows = np.arange(num_experts) if placement is None else rows_after_move(np.arange(num_experts), placement)
    if one_rank:
        local = num_experts // world
        rows = rows[rank * local:(rank + 1) * local]  # this rank's slots
    experts = GroupedExperts(num_experts, model_cfg.hidden, moe_cfg.expert_hidden, model_cfg.init_std, out_std,
                             None if placement is None and not one_rank else rows)
    where = (backend, exchange, first, topology.nodes, topology.devices_per_node)
    if kernels == "ascend_builtin":  # compact rows; under expert parallelism only ragged (`ops.shipped.unfit`)
        dispatcher = CompactDispatcher(num_experts, held, world, topology.nodes,
                                       exchange=None if backend == "local" else CompactExchange(*where))
        ep = None
    else:
        dispatcher = Dispatcher(num_experts, held, world, topology.nodes, kernels)
        ep = None if backend == "local" else (RaggedExchange if exchange_layout == "ragged" else Exchange)(*where)
    return MoELayer(router, dispatcher, experts, held, ep, first, world, moe_cfg.aux_scope, placement)


def build_model(cfg, rank=0):
    """PanguModel from a `RunConfig`; `rank` is this process's world rank on a multi-process backend.

    Its routers take their training noise from buffers the trainer fills each step (`feed_noise`).
    """
    check(cfg)
    p = cfg.parallel
    slots = initial_slots(cfg)
    topology = Topology(p.nodes, p.devices_per_node, cfg.moe.num_experts,
                        None if slots is None else tuple(int(s) for s in slots))
    group_tokens = cfg.train.batch_size * cfg.model.seq_len // topology.world_size
    model = PanguModel(cfg.model, cfg.moe, topology, p.dispatch, p.exchange, rank,
                       run_kernel_backend(cfg), group_tokens, p.exchange_layout, slots)
    model.use_precision(cfg.train.precision, cfg.moe.router_dtype, cfg.runtime.device)
    return model


def is_expert_parameter(name):
    """True for expert FFN weights (hybrid-eps Adam, domain extraction)."""
    return ".experts." in name


def extract_domain(model, domain):
    """Domain sub-model: all shared weights plus only group `domain`'s experts, routers and tables.

    On inputs of that domain, with the same capacity, its logits are bit-identical to the full model's. Its experts
    are in expert order whatever the full model's placement (`in_expert_order`); it has no placement.

    Args:
        model: a PanguModel with `moe.num_groups > 1`.
        domain: domain id (= group id).
    Returns:
        a PanguModel with one group of E_g experts.
    """
    moe = model.moe_cfg
    if moe.num_groups == 1:
        raise ValueError("extract_domain: the model has one expert group; every domain uses all experts")
    if not 0 <= domain < moe.num_groups:
        raise ValueError(f"extract_domain: domain = {domain}: must be in [0, {moe.num_groups})")
    sub_moe = dataclasses.replace(moe, num_experts=moe.num_experts // moe.num_groups, num_groups=1)
    sub = PanguModel(model.model_cfg, sub_moe)
    sub.use_precision(*model.precision)
    source = in_expert_order({p.name: p.asnumpy() for p in model.get_parameters()}, model)
    for p in sub.get_parameters():
        p.set_data(Tensor(domain_slice(p.name, source[p.name], domain, moe.num_experts, moe.num_groups), p.dtype))
    return sub


def in_expert_order(arrays, model):
    """{name: numpy} of `model`'s parameters or optimizer moments (`adam_m.<name>`) with each MoE layer's expert
    rows put back in expert order, undoing its placement (`MoELayer`'s placement: row s holds the expert whose
    slot is s). Other entries, and layers without a placement, are returned as they are."""
    out = dict(arrays)
    for layer, block in enumerate(model.moe_blocks):
        if block.moe.expert_slot is None:
            continue
        slots = block.moe.expert_slot.asnumpy()
        for name, value in arrays.items():
            if is_expert_parameter(name) and f"moe_blocks.{layer}.moe." in name:
                out[name] = value[slots]  # (E, ...): row e is expert e
    return out


def domain_slice(name, value, domain, num_experts, num_groups):
    """The part of parameter `name` (or of its optimizer moment, `adam_m.<name>`) that group `domain`'s
    sub-model keeps: rows of the group's experts of an expert tensor, the group's row of a per-group router
    weight, table or bias, all of anything else. numpy array -> contiguous numpy array."""
    per_group = num_experts // num_groups
    if is_expert_parameter(name):
        value = value[domain * per_group:(domain + 1) * per_group]  # (E_g, ...) <- (E, ...)
    elif name.rsplit(".", 1)[-1] in ("weight", "table", "bias") and ".router." in name:
        value = value[domain:domain + 1]  # (1, ...) <- (G, ...)
    return np.array(value, order="C")  # a copy; keeps 0-d values 0-d (np.ascontiguousarray would not)
