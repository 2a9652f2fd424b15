"""moe_gating: scores, top-K choice, gate and position slots under capacity, in one op.

The reference functions here are the specification (kernels/README.md) and are what the routers
call on the reference path: `gating_scores` (score function and choice), `position_slots` (the
position policy), `reference_gating` (both, plus the demand per expert). The custom op fuses them
into one kernel pass with an explicit backward kernel.

The choice is the top-K of the logits, not of the scores: softmax is monotone, so it is the same
choice, but it does not depend on how exp and the sum round, so two implementations agree on it
exactly. Ties go to the lower expert id (`ops.topk` breaks ties inconsistently on CPU).
"""
import mindspore as ms
from mindspore import Tensor, nn, ops

from pangu_moe.ops.custom import aot_op

SOFTMAX, SOFTMAX_NORMALIZE, GRAP = 0, 1, 2  # gating modes, as GatingMode in kernels/common/moe_kernel_common.h
GATING_MODES = (SOFTMAX, SOFTMAX_NORMALIZE, GRAP)
_ARGMAX = ops.Argmax(axis=-1, output_type=ms.int32)  # first maximum on ties


def choose_top_k(values, top_k):
    """values [T, n] fp32 -> [T, K] int32: indices of the K largest, largest first, ties to the lower index."""
    num_values = values.shape[-1]
    positions = ops.arange(num_values, dtype=ms.int32).reshape(1, -1)  # (1, n)
    picks = ()
    for k in range(top_k):
        index = _ARGMAX(values)  # (T,)
        picks += (index,)
        if k + 1 < top_k:
            taken = positions == index.reshape(-1, 1)  # (T, n)
            values = ops.select(taken, ops.full_like(values, float("-inf")), values)
    return ops.stack(picks, 1)


def gating_scores(logits, top_k, mode):
    """The score function and the choice.

    Args:
        logits: [T, E_g] fp32 (GRAP: the pre-ReLU GrAP logits), finite.
        top_k: K; mode: one of GATING_MODES.
    Returns:
        scores [T, E_g] fp32 (softmax of logits; GRAP: of relu(logits)), local_index [T, K] int32,
        gate [T, K] fp32 (scores at the choice; SOFTMAX_NORMALIZE with K > 1: divided by their sum).
    """
    activated = ops.relu(logits) if mode == GRAP else logits
    scores = ops.softmax(activated, axis=-1)
    local_index = choose_top_k(logits, top_k)
    gate = ops.gather_elements(scores, 1, local_index)
    if mode == SOFTMAX_NORMALIZE and top_k > 1:
        gate = gate / gate.sum(-1, keepdims=True)
    return scores, local_index, gate


def position_slots(expert_index, num_experts, capacity, requested=None):
    """Position policy: every first choice before any second choice, tokens in order.

    Args:
        expert_index: [T, K] int32 global expert ids.
        num_experts: E.
        capacity: C, slots per expert (python int or int32 scalar tensor).
        requested: optional [T, K] bool; unrequested choices take no slot.
    Returns:
        slot: [T, K] int32, the position of choice (t, k) in its expert's arrival order
              (contiguous from 0 per expert over the requested choices; may be >= C).
        keep: [T, K] bool, requested and slot < C.
    """
    num_tokens, top_k = expert_index.shape
    order = expert_index.T.reshape(-1)  # (K*T,) <- (K, T): all first choices, then all second choices
    onehot = ops.one_hot(order, num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))  # (K*T, E)
    if requested is not None:
        onehot = onehot * requested.T.reshape(-1, 1).astype(ms.int32)
    position = (ops.cumsum(onehot, 0) * onehot).sum(1).astype(ms.int32) - 1  # (K*T,)
    slot = position.reshape(top_k, num_tokens).T  # (T, K) <- (K, T)
    return slot, keep_under_capacity(slot, capacity, requested)


def keep_under_capacity(slot, capacity, requested=None):
    """[T, K] bool: the slot is below C (and the choice was requested)."""
    keep = slot < capacity
    return keep if requested is None else keep & requested


def reference_gating(logits, group_ids, capacity, top_k, num_experts, mode):
    """moe_gating by plain MindSpore ops.

    Args:
        logits: [T, E_g] fp32, the token's own group's logits; group_ids: [T] int32;
        capacity: python int C; top_k: K; num_experts: E = G * E_g; mode: one of GATING_MODES.
    Returns:
        scores [T, E_g] fp32, expert_index [T, K] int32 (group * E_g + local), gate [T, K] fp32,
        slot [T, K] int32, keep [T, K] bool, tokens_per_expert [E] int32 (demand before dropping).
    """
    scores, local_index, gate = gating_scores(logits, top_k, mode)
    expert_index = local_index + (group_ids * logits.shape[1]).reshape(-1, 1)  # (T, K) + (T, 1)
    slot, keep = position_slots(expert_index, num_experts, capacity)
    demand = ops.unsorted_segment_sum(ops.ones(expert_index.shape, ms.int32).reshape(-1), expert_index.reshape(-1),
                                      num_experts)
    return scores, expert_index, gate, slot, keep, demand


class ReferenceGating(nn.Cell):
    """`reference_gating` as a cell. Args: top_k K, num_experts E, mode (GATING_MODES)."""

    def __init__(self, top_k, num_experts, mode):
        super().__init__()
        if mode not in GATING_MODES:
            raise ValueError(f"gating mode {mode!r}: must be one of {GATING_MODES}")
        self.top_k, self.num_experts, self.mode = top_k, num_experts, mode

    def construct(self, logits, group_ids, capacity):
        """logits [T, E_g] fp32, group_ids [T] int32, capacity python int -> the outputs of `reference_gating`."""
        return reference_gating(logits, group_ids, capacity, self.top_k, self.num_experts, self.mode)


class CustomGating(ReferenceGating):
    """moe_gating by the `cpu` or `ascend` kernels (same call and outputs as `ReferenceGating`)."""

    def __init__(self, top_k, num_experts, mode, backend):
        super().__init__(top_k, num_experts, mode)
        inputs = (("logits", "f32"), ("group_ids", "i32"), ("options", "i32"))

        def grad_shape(logits, group_ids, options, scores, expert_index, gate, d_scores, d_gate):
            return logits

        def grad_dtype(logits, group_ids, options, scores, expert_index, gate, d_scores, d_gate):
            return logits

        self.gating_grad = grad = aot_op("MoeGatingGrad", backend,
                                        inputs + (("scores", "f32"), ("expert_index", "i32"), ("gate", "f32"),
                                                  ("d_scores", "f32"), ("d_gate", "f32")),
                                        (("d_logits", "f32"),), grad_shape, grad_dtype,
                                        attrs={"mode": mode, "top_k": top_k})

        def shape(logits, group_ids, options):
            choices = [logits[0], top_k]
            return logits, choices, choices, choices, choices, [num_experts]

        def dtype(logits, group_ids, options):
            return logits, ms.int32, logits, ms.int32, ms.bool_, ms.int32

        def bprop(logits, group_ids, options, out, dout):
            d_logits = grad(logits, group_ids, options, out[0], out[1], out[2], dout[0], dout[2])
            return d_logits, ops.zeros_like(group_ids), ops.zeros_like(options)

        outputs = (("scores", "f32"), ("expert_index", "i32"), ("gate", "f32"), ("slot", "i32"), ("keep", "bool"),
                   ("tokens_per_expert", "i32"))
        self.gating = aot_op("MoeGating", backend, inputs, outputs, shape, dtype, bprop,
                             attrs={"mode": mode, "top_k": top_k, "num_experts": num_experts})

    def construct(self, logits, group_ids, capacity):
        """As `ReferenceGating.construct`."""
        options = ms.Tensor([capacity, self.mode], ms.int32)  # AOT kernels take no attributes on CPU
        return self.gating(logits.astype(ms.float32), group_ids, options)
