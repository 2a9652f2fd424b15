"""Batched expert FFNs: one weight tensor per projection, [E, H, F] and [E, F, H]."""

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.activations import fast_gelu
from pangu_moe.precision import operand


class GroupedExperts(nn.Cell):
    """E two-layer GeLU FFNs applied to their own buffers with two batched matmuls.

    Parameter names `w_in` / `w_out` under an `experts` cell mark expert parameters (hybrid-eps Adam,
    domain extraction).

    Args:
        num_experts: E; hidden: H; expert_hidden: F; init_std: normal init std (w_out is scaled by
        1/sqrt(2 * num_layers) through `out_std`).
        rows: int [n], the rows of the [E, ...] draw to hold, in order (None: all E in expert order). Expert
            parallelism holds a rank's slots; a placement puts expert rows in their slots (`MoELayer`). The full
            [E, ...] tensors are drawn first and then indexed, so a held row equals the same expert of a model
            built from the same seed without either (at the cost of holding all E experts briefly at build
            time; a model too large for that needs a per-shard initializer).
    """

    bf16_operands = False  # set by `PanguModel.use_precision` (the CPU bf16 form)

    def __init__(self, num_experts, hidden, expert_hidden, init_std=0.02, out_std=None, rows=None):
        super().__init__()
        out_std = init_std if out_std is None else out_std
        self.w_in = Parameter(initializer(Normal(init_std), (num_experts, hidden, expert_hidden), ms.float32),
                              name="w_in")
        self.w_out = Parameter(initializer(Normal(out_std), (num_experts, expert_hidden, hidden), ms.float32),
                               name="w_out")
        if rows is not None:
            self.w_in = Parameter(Tensor(self.w_in.asnumpy()[rows]), name="w_in")  # (n, H, F)
            self.w_out = Parameter(Tensor(self.w_out.asnumpy()[rows]), name="w_out")  # (n, F, H)

    def construct(self, expert_in):
        """expert_in [E, C, H] -> expert_out [E, C, H], both in expert_in's dtype (the weights are cast to it; under
        the CPU bf16 form every operand is rounded to bf16, `precision.compute_form`)."""
        dt, bf16 = expert_in.dtype, self.bf16_operands
        hidden = fast_gelu(ops.bmm(operand(expert_in, dt, bf16), operand(self.w_in, dt, bf16)))
        return ops.bmm(operand(hidden, dt, bf16), operand(self.w_out, dt, bf16))
