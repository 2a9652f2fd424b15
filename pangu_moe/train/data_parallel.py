"""Gradient and metric reduction when each process holds one of W ranks (`msrun_cpu`, `hccl`).

The objective is the mean of the W ranks' losses, each the mean over its own tokens: exactly the
single-process loss over the whole batch (every rank holds batch_size/W sequences).
- Shared (data-parallel) parameters: each rank's gradient is that of its own loss, so the objective's
  gradient is their mean: AllReduce(sum) / W. The gradients are reduced in buckets, as DDP and
  MindSpore's DistributedGradReducer fuse them: consecutive gradients are flattened into one buffer of at
  most `bucket_bytes`, reduced by one AllReduce and split again, so a step issues one collective per bucket
  instead of one per parameter. Each element is summed over the same W values either way.
- Expert parameters live on one rank only (`RunConfig.validate` requires W to divide E on every backend
  with an exchange, so no expert has replicas to reduce over). The exchange's backward already sums into
  them the gradient of every rank's loss (tokens of all ranks reached them), so they are divided by W and
  not reduced.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from pangu_moe.model.pangu import is_expert_parameter


BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket size


def buckets(params, bucket_bytes=BUCKET_BYTES):
    """Consecutive groups of the shared (non-expert) parameters' indices, each of at most `bucket_bytes` of fp32
    gradient (a larger parameter alone): a tuple of tuples of indices into `params`."""
    groups, current, size = [], [], 0
    for i, p in enumerate(params):
        if is_expert_parameter(p.name):
            continue
        nbytes = 4 * int(np.prod(p.shape))
        if current and size + nbytes > bucket_bytes:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        groups.append(tuple(current))
    return tuple(groups)


class DataParallel(nn.Cell):
    """Args: params: the optimizer's Parameters (order of the gradient tuple); world_size: W; bucket_bytes: the
    largest gradient buffer one AllReduce reduces (`buckets`)."""

    def __init__(self, params, world_size, bucket_bytes=BUCKET_BYTES):
        super().__init__()
        self.sharded = tuple(is_expert_parameter(p.name) for p in params)
        self.buckets = buckets(params, bucket_bytes)
        # Where each shared gradient sits: (bucket, offset, size, shape), static so the compiled step slices.
        place = {}
        for b, bucket in enumerate(self.buckets):
            offset = 0
            for i in bucket:
                size = int(np.prod(params[i].shape))
                place[i] = (b, offset, size, tuple(params[i].shape))
                offset += size
        self.places = tuple(place.get(i) for i in range(len(params)))
        self.world_size = world_size
        self.all_reduce = ops.AllReduce()
        self.all_gather = ops.AllGather()

    def grads(self, grads):
        """Per-rank gradients -> gradients of the mean loss (tuple in `params` order): experts' divided by W, the
        shared ones all-reduced bucket by bucket (one collective each) and divided by W."""
        reduced = ()
        for bucket in self.buckets:
            flat = ops.concat([grads[i].reshape(-1) for i in bucket])  # (sum of the bucket's sizes,)
            reduced += (self.all_reduce(flat) / self.world_size,)
        out = ()
        for g, place in zip(grads, self.places):
            if place is None:
                out += (g / self.world_size,)
            else:
                b, offset, size, shape = place
                out += (reduced[b][offset:offset + size].reshape(shape),)  # the parameter's shape <- (size,)
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

    def sum_rows(self, array):
        """numpy [M, ...] fp32 (this rank's) -> numpy [M, ...]: the sum of every rank's, from host to host."""
        return self.all_reduce(Tensor(array)).asnumpy()

    def barrier(self):
        """Return once every rank has called it (host side, between steps)."""
        self.all_reduce(Tensor(1.0, ms.float32)).asnumpy()

    def gather_rows(self, x):
        """x [b, ...] (this rank's rows) -> [W*b, ...] in rank order."""
        return self.all_gather(x)
