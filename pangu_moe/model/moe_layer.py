"""The MoE layer: route -> dispatch -> experts -> combine, each step its own cell."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from pangu_moe.dispatch.ragged import to_other_nodes
from pangu_moe.precision import operand
from pangu_moe.routing.base import Routing

ROUTING_FIELDS = len(Routing._fields)
LOSSES_FIELD = Routing._fields.index("losses")  # averaged over rank groups; the other fields are per token


class MoELayer(nn.Cell):
    """Sparse FFN replacing the dense FFN of a block.

    The process holds R ranks' tokens (R = W on `local` and `simulated`, 1 on a multi-process backend),
    rank `first_rank + r` holding tokens [r*T/R, (r+1)*T/R). Each rank is its own routing group with
    capacity C: it routes and assigns slots alone, as it would on a real cluster, and its send buffer
    [W, E_loc, C, H] is destination-major (slot s lives on rank s // E_loc; expert e in slot e unless a
    `placement` moves it).

    Args:
        router: a `routing.base.Router`.
        dispatcher: `dispatch.dispatcher.Dispatcher` over R*E buffers (one [E, C, H] per rank held here); its
            layout op also counts the tokens per (rank, expert). Or `ops.shipped.CompactDispatcher`
            (kernels ascend_builtin): compact rows grouped by expert instead of buffers, moved by the dispatcher's
            own exchange under expert parallelism (`exchange` is then not used).
        experts: `experts.GroupedExperts` with the experts of the ranks held here (all E, or E_loc).
        num_ranks: R ranks held by this process.
        exchange: `dispatch.ragged.RaggedExchange` (kept rows only) or `dispatch.exchange.Exchange` (every slot),
            or None for the `local` backend: one buffer [E, R*C, H] over all ranks' slots, no exchange.
        first_rank: world rank of the first rank held here.
        world_size: W (= R unless the backend runs one rank per process).
        aux_scope: "rank" or "global" (`route`; global only where the process holds every rank).
        placement: None (expert e in slot e) or an int array [E], the slot of each expert (`dispatch.placement`):
            the experts' weights and every buffer are in slot order, and each kept choice goes to its expert's
            slot. It is held in Parameters a checkpoint carries and the trainer updates (`train.placement`):
            `expert_slot` [E] int32 and `placement_window` [W, E] int32 (kept choices per (source rank, expert)
            since the last placement).

    Precision (`PanguModel.use_precision`): the dispatch buffers, the experts and the exchange run in
    `compute_dtype`; the router sees its input in `router_dtype` (fp32 unless the router-precision ablation)
    and routes in fp32; the output is fp32.
    """

    compute_dtype, bf16_operands = ms.float32, False
    router_dtype = ms.float32

    def __init__(self, router, dispatcher, experts, num_ranks=1, exchange=None, first_rank=0, world_size=None,
                 aux_scope="rank", placement=None):
        super().__init__()
        self.global_losses = aux_scope == "global" and num_ranks > 1
        self.router = router
        self.dispatcher = dispatcher
        self.experts = experts
        self.num_experts = router.num_experts
        self.num_ranks = num_ranks
        self.exchange = exchange
        # the hierarchical ragged exchange sends one row per (token, other node) and counts them (`apply`)
        self.deduplicates = exchange is not None and exchange.ragged and exchange.blocks.hierarchical
        self.first_rank = first_rank
        self.world_size = world_size or num_ranks
        self.expert_slot = None
        if placement is not None:
            self.expert_slot = Parameter(Tensor(np.asarray(placement, np.int32)), name="expert_slot",
                                         requires_grad=False)
            self.placement_window = Parameter(Tensor(np.zeros((self.world_size, self.num_experts), np.int32)),
                                              name="placement_window", requires_grad=False)

    def route(self, x, token_ids, group_ids, capacity, training):
        """Route each rank's tokens as its own group; the router losses are the mean over the R groups
        (`aux_scope` rank) or those of all R groups' tokens at once (global).

        Returns the router outputs of `routing.base.Router.construct` concatenated over ranks ([T, K]).
        """
        x = x.astype(self.router_dtype)
        if self.num_ranks == 1:
            return self.router(x, token_ids, group_ids, capacity, training, self.first_rank)
        n = x.shape[0] // self.num_ranks
        parts = ()
        for r in range(self.num_ranks):
            parts += (self.router(x[r * n:(r + 1) * n], token_ids[r * n:(r + 1) * n], group_ids[r * n:(r + 1) * n],
                                  capacity, training, self.first_rank + r),)
        fields = ()
        for i in range(ROUTING_FIELDS):
            column = ()
            for part in parts:
                column += (part[i],)
            fields += (ops.stack(column).mean(0) if i == LOSSES_FIELD else ops.concat(column, 0),)
        if self.global_losses:
            # moe.aux_scope = global: the losses of all R ranks' tokens routed as one group. The aux loss then
            # takes f and P over every token; the z and locality losses equal the per-rank mean (T/R tokens a
            # rank). The slots of that call are not used: routing stays per rank group.
            everything = self.router(x, token_ids, group_ids, capacity, training, None)
            fields = fields[:LOSSES_FIELD] + (everything[LOSSES_FIELD],) + fields[LOSSES_FIELD + 1:]
        return fields

    def run_experts(self, buffer, flat_index, tokens):
        """buffer [R, E, C, H] (rank r's tokens for expert e), flat_index [T*K] int32 (`Dispatcher.layout`),
        tokens [T, H] (what the buffer was gathered from; the hierarchical ragged exchange sends these rows
        once per node instead of the buffer's slots) -> (expert outputs in the buffer's layout (zero in empty
        slots after a ragged exchange), the rows each held rank's dispatch sent to other nodes [R] int32 as the
        hierarchical ragged exchange counted them, or None where one row travels per kept choice)."""
        r, e, c, h = buffer.shape
        if self.exchange is None:
            expert_in = ops.swapaxes(buffer, 0, 1).reshape(e, r * c, h)  # (E, R*C, H) <- (E, R, C, H)
            return ops.swapaxes(self.experts(expert_in).reshape(e, r, c, h), 0, 1), None  # (R, E, C, H)
        w = self.world_size
        e_loc = e // w
        # which token each slot holds (1-based within its rank, 0 empty): flat_index is R*E*C for a dropped choice
        n = tokens.shape[0] // r
        token = (ops.arange(flat_index.shape[0], dtype=ms.int32) // (flat_index.shape[0] // tokens.shape[0])) % n + 1
        slot_token = ops.scatter_nd(flat_index.reshape(-1, 1), token, (r * e * c + 1,))[:-1]
        slot_token = slot_token.reshape(r, w, e_loc * c)  # (R, W, E_loc*C): destination-major blocks
        received, state, inter_rows = self.exchange.dispatch(buffer.reshape(r, w, e_loc * c, h), slot_token,
                                                             tokens.reshape(r, n, h))  # (R, W sources, S, H)
        received = received.reshape(r, w, e_loc, c, h)  # (R, W sources, E_loc, C, H)
        expert_in = ops.swapaxes(received, 1, 2).reshape(r * e_loc, w * c, h)  # (R*E_loc, W*C, H)
        expert_out = ops.swapaxes(self.experts(expert_in).reshape(r, e_loc, w, c, h), 1, 2)  # (R, W, E_loc, C, H)
        back = self.exchange.combine(expert_out.reshape(r, w, e_loc * c, h), state)  # at the sources: (R, W, S, H)
        return back.reshape(r, e, c, h), inter_rows

    def construct(self, x, token_ids, group_ids, capacity, training):
        """Apply the layer to the R ranks' tokens: `route`, then `apply`.

        Args:
            x: [T, H]; token_ids, group_ids: [T] int32; capacity: python int C per rank group;
            training: python bool.
        Returns: as `apply`.
        """
        return self.apply(x, self.route(x, token_ids, group_ids, capacity, training), capacity)

    def layout(self, routing, capacity):
        """The buffer row of every choice and the token accounting (`Dispatcher.layout`) for a routing of the R
        ranks' T tokens: (flat_index [T*K] int32, tokens_per_expert [R, E], kept_per_expert [R, E], send and
        node counts). Buffers and counts are in slot order (`placement`; expert order without a map)."""
        expert_index, _, keep, slot, requested = routing[:5]
        num_tokens = expert_index.shape[0]
        rank = (ops.arange(num_tokens, dtype=ms.int32) // (num_tokens // self.num_ranks)).reshape(-1, 1)  # (T, 1)
        pair_index = rank * self.num_experts + self.slot_of(expert_index)  # (T, K): the (source rank, slot) buffer
        return self.dispatcher.layout(pair_index, slot, keep, requested, capacity)

    def slot_of(self, expert_index):
        """expert_index [T, K] int32 -> the slot hosting each chosen expert [T, K] int32 (`placement`)."""
        return expert_index if self.expert_slot is None else ops.gather(self.expert_slot, expert_index, 0)

    def by_expert(self, counts):
        """counts [R, E] in slot order -> [R, E] in expert order (`placement`)."""
        return counts if self.expert_slot is None else ops.gather(counts, self.expert_slot, 1)

    def apply(self, x, routing, capacity):
        """Dispatch, run the experts and combine, for a routing `route` computed.

        Args:
            x: [T, H] fp32; routing: the tuple of `route` (fields of `routing.base.Routing`); capacity: python int.
        Returns:
            y [T, H] fp32 (0 for fully dropped tokens; the block's residual carries them),
            losses [3] fp32 (weighted, named by `routing.base.LOSS_NAMES`; mean over rank groups),
            tokens_per_expert [R, E] int32 (requested choices of each rank's tokens, before dropping),
            kept_per_expert [R, E] int32,
            policy_term [T] fp32: the router's per-token input to its `objective` (`Router.combine`),
            inter_rows [R] int32: the rows each rank's dispatch sent to other nodes: one per (token, other node)
                as the hierarchical ragged exchange counted them on its messages, else one per kept choice (what
                a flat exchange sends; on `local` the ranks and nodes are those of the topology).
        """
        expert_index, gate, keep, _, _, losses, log_prob = routing
        hidden = x.shape[1]
        flat_index, tokens_per_expert, kept_per_expert, _, node_counts = self.layout(routing, capacity)
        if self.dispatcher.compact:  # ascend_builtin (ops/shipped.py): compact rows, the dispatcher's own exchange
            rows, order = self.dispatcher.dispatch_compact(x.astype(self.compute_dtype), self.slot_of(expert_index),
                                                           keep, capacity)
            expert_rows = self.dispatcher.run_experts(rows, order, kept_per_expert, capacity, self.experts.w_in,
                                                      self.experts.w_out)
            y, policy_term = self.router.combine(self.dispatcher, expert_rows, order, gate, keep, log_prob)
            return (y.astype(ms.float32), losses, self.by_expert(tokens_per_expert), self.by_expert(kept_per_expert),
                    policy_term, self.crossing(node_counts))
        tokens = operand(x, self.compute_dtype, self.bf16_operands)  # the buffers and the exchange hold these
        buffer = self.dispatcher.dispatch(tokens, flat_index, capacity)  # (R*E, C, H)
        expert_out, inter_rows = self.run_experts(buffer.reshape(self.num_ranks, self.num_experts, capacity, hidden),
                                                  flat_index, tokens)
        expert_out = expert_out.reshape(self.num_ranks * self.num_experts, capacity, hidden)  # (R*E, C, H)
        y, policy_term = self.router.combine(self.dispatcher, expert_out, flat_index, gate, keep, log_prob)
        return (y.astype(ms.float32), losses, self.by_expert(tokens_per_expert), self.by_expert(kept_per_expert),
                policy_term, self.crossing(node_counts) if inter_rows is None else inter_rows)

    def crossing(self, node_counts):
        """node_counts [R, N] int32 (kept choices by destination node, `Dispatcher.layout`) -> [R] int32: those
        sent to another node than the rank's own."""
        return to_other_nodes(node_counts, self.first_rank, self.world_size // node_counts.shape[1])

