"""A worker for the one-rank-a-process test of ascend_builtin under expert parallelism, run by
run_scripts/run_msrun_cpu.sh --script.

Usage: compact_exchange_worker.py OUT_DIR CAPACITY. Each rank builds the layer of `tests.ops.test_compact_exchange`
(`rank_layer`: its router, its experts, the emulated shipped ops) on the msrun_cpu exchange, runs its tokens of
OUT_DIR/inputs.npz forward and backward (the loss sum(y * y) of its tokens) and saves y, dx and the gradients by
parameter name as OUT_DIR/rank{r}.npz.
"""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_rank, init

from tests.ops.test_compact_exchange import rank_layer


def main(out, capacity):
    init()
    rank = get_rank()
    inputs = dict(np.load(os.path.join(out, "inputs.npz")))
    layer, x = rank_layer(inputs, rank)
    zeros = Tensor(np.zeros(x.shape[0], np.int32))
    weights = layer.trainable_params()

    def f(x_in):
        y = layer(x_in, zeros, zeros, capacity, False)[0]
        return (y * y).sum()
    y = layer(x, zeros, zeros, capacity, False)[0]
    _, (dx, dw) = ms.value_and_grad(f, 0, weights)(x)
    np.savez(os.path.join(out, f"rank{rank}.npz"), y=y.asnumpy(), dx=dx.asnumpy(),
             **{f"d_{p.name}": g.asnumpy() for p, g in zip(weights, dw)})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
