"""Dense FFN of the dense blocks and the query layer."""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.activations import fast_gelu


class DenseMLP(nn.Cell):
    """Two-layer GeLU FFN without biases: [..., H] -> [..., H] fp32 through F, computed in `compute_dtype`."""

    compute_dtype = ms.float32  # set by `PanguModel.use_precision`

    def __init__(self, hidden, ffn_hidden, init_std=0.02, out_std=None):
        super().__init__()
        out_std = init_std if out_std is None else out_std
        self.w_in = Parameter(initializer(Normal(init_std), (hidden, ffn_hidden), ms.float32), name="w_in")
        self.w_out = Parameter(initializer(Normal(out_std), (ffn_hidden, hidden), ms.float32), name="w_out")

    def construct(self, x):
        """x [..., H] -> [..., H]."""
        dt = self.compute_dtype
        return ops.matmul(fast_gelu(ops.matmul(x.astype(dt), self.w_in.astype(dt))), self.w_out.astype(dt)).astype(
            ms.float32)
