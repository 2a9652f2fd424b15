"""Gradient and metric reduction when each process holds one of W ranks (`msrun_cpu`, `hccl`).

The objective is the mean of the W ranks' losses, each the mean over its own tokens: exactly the
single-process loss over the whole batch (every rank holds batch_size/W sequences).
- Shared (data-parallel) parameters: each rank's gradient is that of its own loss, so the objective's
  gradient is their mean: AllReduce(sum) / W.
- Expert parameters live on one rank only. The exchange's backward already sums into them the
  gradient of every rank's loss (tokens of all ranks reached them), so they are divided by W and not
  reduced.
"""
import mindspore as ms
from mindspore import Tensor, nn, ops

from pangu_moe.model.pangu import is_expert_parameter


class DataParallel(nn.Cell):
    """Args: params: the optimizer's Parameters (order of the gradient tuple); world_size: W."""

    def __init__(self, params, world_size):
        super().__init__()
        self.sharded = tuple(is_expert_parameter(p.name) for p in params)
        self.world_size = world_size
        self.all_reduce = ops.AllReduce()
        self.all_gather = ops.AllGather()

    def grads(self, grads):
        """Per-rank gradients -> gradients of the mean loss (tuple in `params` order)."""
        out = ()
        for g, sharded in zip(grads, self.sharded):
            out += (g / self.world_size if sharded else self.all_reduce(g) / self.world_size,)
        return out

    def square_sum(self, grads):
        """Global sum of squares of reduced grads: shared parts are equal on all ranks, shards are summed."""
        shared = ops.zeros((), ms.float32)
        sharded = ops.zeros((), ms.float32)
        for g, is_shard in zip(grads, self.sharded):
            if is_shard:
                sharded = sharded + (g * g).sum()
            else:
                shared = shared + (g * g).sum()
        return shared + self.all_reduce(sharded)

    def mean(self, x):
        """The mean over ranks of a float tensor."""
        return self.all_reduce(x) / self.world_size

    def gather_ranks(self, counts):
        """counts [L, 1, E] int32 (this rank's) -> [L, W, E] int32 (all ranks, in rank order)."""
        layers, _, experts = counts.shape
        gathered = self.all_gather(counts.astype(ms.float32))  # (W*L, 1, E): rank-major
        return ops.swapaxes(gathered.reshape(self.world_size, layers, experts), 0, 1).astype(ms.int32)

    def barrier(self):
        """Return once every rank has called it (host side, between steps)."""
        self.all_reduce(Tensor(1.0, ms.float32)).asnumpy()

    def gather_rows(self, x):
        """x [b, ...] (this rank's rows) -> [W*b, ...] in rank order."""
        return self.all_gather(x)
