"""The one collective the exchange needs: an all-to-all inside a rank group, per backend.

Every primitive maps x [R, G, ...] -> [R, G, ...], where R is the number of ranks this process holds
(all W for `simulated`, 1 otherwise) and G the size of the group: on entry x[r, j] is what rank r
sends to the j-th member of its group, on exit x[r, j] is what rank r received from the j-th member.

Groups are the world, a node's ranks (`intra`) or the ranks with the same local rank on every node
(`inter`); rank = node * D + local rank (`dispatch.topology.Topology`). The group-wise exchange
(`dispatch.group_wise`) adds tensor-parallel groups of mp consecutive ranks (`tp`) and the expert-parallel
groups of the ranks at the same position in their tp group (`ep`).
"""
from mindspore import nn, ops

GROUP_KINDS = ("world", "intra", "inter", "tp", "ep")
_CREATED_GROUPS = set()  # sub-groups this process has created


def group_members(kind, rank, nodes, devices_per_node, mp=1):
    """The world ranks of `rank`'s group of `kind`, in member order: list of ints (`mp`: the tp group size)."""
    node, local = divmod(rank, devices_per_node)
    if kind == "tp":
        return list(range(rank - rank % mp, rank - rank % mp + mp))
    if kind == "ep":
        return list(range(rank % mp, nodes * devices_per_node, mp))
    if kind == "world":
        return list(range(nodes * devices_per_node))
    if kind == "intra":
        return [node * devices_per_node + d for d in range(devices_per_node)]
    if kind == "inter":
        return [n * devices_per_node + local for n in range(nodes)]
    raise ValueError(f"group kind {kind!r}: must be one of {', '.join(GROUP_KINDS)}")


def group_name(kind, rank, nodes, devices_per_node, mp=1):
    """A name for `rank`'s sub-group of `kind` (not "world"), the same on all its members."""
    node, local = divmod(rank, devices_per_node)
    return {"intra": f"ep_intra_node{node}", "inter": f"ep_inter_local{local}", "tp": f"tp{mp}_group{rank // mp}",
            "ep": f"ep_tp{mp}_position{rank % mp}"}[kind]


class SimulatedAllToAll(nn.Cell):
    """All W ranks in one process: the exchange is a transpose of the (source, destination) axes.

    Args: kind: a GROUP_KINDS name; nodes N, devices_per_node D.
    """

    def __init__(self, kind, nodes, devices_per_node):
        super().__init__()
        self.kind, self.nodes, self.devices = kind, nodes, devices_per_node

    def construct(self, x):
        """x [W, G, ...] -> [W, G, ...]."""
        n, d = self.nodes, self.devices
        rest = x.shape[2:]
        if self.kind == "world":
            return ops.swapaxes(x, 0, 1)
        if self.kind == "intra":
            grid = x.reshape((n, d, d) + rest)  # (node, sender d, receiver e, ...)
            return ops.swapaxes(grid, 1, 2).reshape((n * d, d) + rest)  # out[n, e, d] = x[n, d, e]
        grid = x.reshape((n, d, n) + rest)  # inter: (sender node, local rank, receiver node, ...)
        return ops.swapaxes(grid, 0, 2).reshape((n * d, n) + rest)  # out[m, d, n] = x[n, d, m]


def join_group(kind, rank, nodes, devices_per_node, mp=1):
    """Create `rank`'s sub-group of `kind` once per process, by its members only (MindSpore hangs when a
    non-member calls `create_group`); returns its name."""
    from mindspore.communication import create_group
    name = group_name(kind, rank, nodes, devices_per_node, mp)
    if name not in _CREATED_GROUPS:
        create_group(name, group_members(kind, rank, nodes, devices_per_node, mp))
        _CREATED_GROUPS.add(name)
    return name


class GatheredAllToAll(nn.Cell):
    """The world exchange with one rank per process on CPU (`msrun_cpu`): world AllGather, then this
    rank's column.

    CPU MindSpore has no AlltoAll (verified on MindSpore 2.10), so the exchange gathers every rank's send
    buffer: W x the bytes of a real all-to-all. The counts that `accounting.traffic` reports are those
    of the real exchange, not of this emulation. The backward of an all-to-all is the same all-to-all,
    run here by `bprop` (AllGather has no CPU gradient: it would need ReduceScatter).

    Args: rank: this process's world rank; world_size W.
    """

    def __init__(self, rank, world_size):
        super().__init__()
        self.position, self.world_size = rank, world_size
        self.all_gather = ops.AllGather()

    def exchange(self, x):
        """x [1, W, ...] -> [1, W, ...]."""
        gathered = self.all_gather(x)  # (W, W, ...): every rank's send buffer
        return gathered[:, self.position].expand_dims(0)  # (1, W, ...)

    def construct(self, x):
        return self.exchange(x)

    def bprop(self, x, out, dout):
        return (self.exchange(dout),)


class GroupReducedAllToAll(nn.Cell):
    """A sub-group exchange with one rank per process on CPU (`msrun_cpu`, the hierarchical stages).

    CPU AllGather works in the world group only, but AllReduce works in a sub-group: each member writes
    its send buffer into its own row of a zero [G, G, ...] tensor, and the group's AllReduce(sum) gives
    every member every row (G x the bytes of a real all-to-all, inside the group only). The gradient
    needs no bprop: AllReduce's gradient is AllReduce, then this rank's row, which is the reverse
    exchange.

    Args: kind ("intra", "inter", "tp", "ep"); rank: world rank; nodes N, devices_per_node D; mp: tp group size.
    """

    def __init__(self, kind, rank, nodes, devices_per_node, mp=1):
        super().__init__()
        members = group_members(kind, rank, nodes, devices_per_node, mp)
        self.position, self.size = members.index(rank), len(members)
        self.all_reduce = ops.AllReduce(group=join_group(kind, rank, nodes, devices_per_node, mp))

    def gather(self, x):
        """x [1, ...] -> [G, ...]: every member's x in member order (the AllGather of the group)."""
        rest = x.shape[1:]
        before = ops.zeros((self.position,) + rest, x.dtype)
        after = ops.zeros((self.size - self.position - 1,) + rest, x.dtype)
        return self.all_reduce(ops.concat((before, x, after), 0))

    def construct(self, x):
        """x [1, G, ...] -> [1, G, ...]."""
        rows = self.gather(x)  # (G, G, ...): row s = member s's buffer
        return rows[:, self.position].expand_dims(0)  # (1, G, ...)


class HcclAllToAll(nn.Cell):
    """Ascend: `ops.AlltoAll` in the group (not run in this repository's CI; see README).

    Every rank belongs to exactly one group of each kind and creates the groups it is in (`join_group`).

    Args: kind; rank: world rank; nodes N, devices_per_node D; mp: tp group size.
    """

    def __init__(self, kind, rank, nodes, devices_per_node, mp=1):
        super().__init__()
        from mindspore.communication import GlobalComm
        members = group_members(kind, rank, nodes, devices_per_node, mp)
        if kind == "world":
            name = GlobalComm.WORLD_COMM_GROUP
        else:
            name = join_group(kind, rank, nodes, devices_per_node, mp)
        self.all_gather = ops.AllGather(group=name)
        # x [1, G, ...]: piece j along axis 1 goes to member j; received pieces are concatenated along axis 1
        # in member order, which is this primitive's contract.
        self.all_to_all = ops.AlltoAll(split_count=len(members), split_dim=1, concat_dim=1, group=name)

    def construct(self, x):
        """x [1, G, ...] -> [1, G, ...]."""
        return self.all_to_all(x)

    def gather(self, x):
        """x [1, ...] -> [G, ...]: every member's x in member order."""
        return self.all_gather(x)


class SumOverRanks(nn.Cell):
    """A count summed over the W ranks, one rank per process (`msrun_cpu`, `hccl`): AllReduce(sum) in the
    world group. Counts carry no gradient, so none is sent back."""

    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        """x [...] fp32 -> [...] the sum of every rank's x."""
        return ops.stop_gradient(self.all_reduce(ops.stop_gradient(x)))


def make_all_to_all(backend, kind, rank, nodes, devices_per_node, mp=1):
    """The primitive of `backend` ("simulated", "msrun_cpu", "hccl") for groups of `kind` (one rank per process
    for the `tp` and `ep` kinds, whose simulated form is `dispatch.group_wise`)."""
    if backend == "simulated":
        return SimulatedAllToAll(kind, nodes, devices_per_node)
    if backend == "msrun_cpu":
        if kind == "world":
            return GatheredAllToAll(rank, nodes * devices_per_node)
        return GroupReducedAllToAll(kind, rank, nodes, devices_per_node, mp)
    if backend == "hccl":
        return HcclAllToAll(kind, rank, nodes, devices_per_node, mp)
    raise ValueError(f"exchange backend {backend!r}: must be simulated, msrun_cpu or hccl")

