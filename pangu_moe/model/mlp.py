"""Dense FFN of the dense blocks and the query layer."""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.activations import fast_gelu
from pangu_moe.precision import operand


class DenseMLP(nn.Cell):
    """Two-layer GeLU FFN without biases: [..., H] -> [..., H] fp32 through F, computed in `compute_dtype`."""

    compute_dtype, bf16_operands = ms.float32, False  # set by `PanguModel.use_precision`

    def __init__(self, hidden, ffn_hidden, init_std=0.02, out_std=None):
        super().__init__()
        out_std = init_std if out_std is None else out_std
        self.w_in = Parameter(initializer(Normal(init_std), (hidden, ffn_hidden), ms.float32), name="w_in")
        self.w_out = Parameter(initializer(Normal(out_std), (ffn_hidden, hidden), ms.float32), name="w_out")

    def construct(self, x):
        """x [..., H] -> [..., H]."""
        dt, bf16 = self.compute_dtype, self.bf16_operands
        hidden = fast_gelu(ops.matmul(operand(x, dt, bf16), operand(self.w_in, dt, bf16)))
        return ops.matmul(operand(hidden, dt, bf16), operand(self.w_out, dt, bf16)).astype(ms.float32)
