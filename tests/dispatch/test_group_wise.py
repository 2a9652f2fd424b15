"""LocMoE's group-wise exchange equals the plain exchange exactly and moves 1/mp of its all-to-all values
(simulated in one process, and msrun_cpu with one rank a process)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.dispatch import group_wise
from pangu_moe.dispatch.collectives import group_members
from pangu_moe.dispatch.group_wise import GroupWiseExchange, check_layout, plain_exchange

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E_LOC, C, H = 2, 4, 3


def replicated_send(world, mp):
    """Send buffers [W, G, E_loc, C, H], identical inside each tp group (the replication tensor parallelism
    gives), every value distinct across tp groups."""
    g = world // mp
    per_group = np.arange(g * g * E_LOC * C * H, dtype=np.float32).reshape(g, 1, g, E_LOC, C, H)
    return np.broadcast_to(per_group, (g, mp, g, E_LOC, C, H)).reshape(world, g, E_LOC, C, H).copy()


def test_group_members_of_tensor_and_expert_parallel_groups():
    assert group_members("tp", 5, 2, 4, mp=2) == [4, 5]
    assert group_members("ep", 5, 2, 4, mp=2) == [1, 3, 5, 7]
    assert group_members("ep", 2, 1, 4, mp=4) == [2]


def test_plain_exchange_sends_block_q_to_the_ep_peer_q():
    send = replicated_send(4, 2)  # G = 2 tp groups of 2
    got = plain_exchange(Tensor(send), 2).asnumpy()
    for rank in range(4):
        g, t = divmod(rank, 2)
        for q in range(2):  # block q of rank (g, t) came from rank (q, t), which sent its block g
            np.testing.assert_array_equal(got[rank, q], send[q * 2 + t, g])


@pytest.mark.parametrize("nodes,devices,mp", [(1, 4, 2), (2, 2, 2), (2, 4, 4), (2, 4, 2), (2, 2, 1)])
def test_group_wise_equals_plain_and_sends_one_mp_th(nodes, devices, mp, monkeypatch):
    world = nodes * devices
    send = replicated_send(world, mp)
    sent = []
    plain = group_wise.plain_exchange
    monkeypatch.setattr(group_wise, "plain_exchange", lambda x, m: (sent.append(x.shape), plain(x, m))[1])
    got = GroupWiseExchange("simulated", 0, nodes, devices, mp)(Tensor(send)).asnumpy()
    np.testing.assert_array_equal(got, plain(Tensor(send), mp).asnumpy())
    g = world // mp
    assert sent == [(world, g, E_LOC, C // mp, H)]  # each rank's all-to-all input: 1/mp of its slots


def test_layouts_it_cannot_run_are_refused():
    with pytest.raises(ValueError, match="tensor-parallel size 3 must divide the 4 devices of a node"):
        check_layout(4, 3, 6)
    with pytest.raises(ValueError, match="capacity 5 must be a multiple of the tensor-parallel size 2"):
        check_layout(4, 2, 5)


@pytest.mark.msrun
def test_msrun_cpu_group_wise_equals_plain(tmp_path):
    nodes, devices, mp = 1, 4, 2
    cmd = ["bash", os.path.join(REPO, "run_scripts", "run_msrun_cpu.sh"), "--workers", "4", "--python", sys.executable,
           "--log-dir", str(tmp_path / "logs"), "--timeout", "300", "--script",
           os.path.join(REPO, "tests", "dispatch", "group_wise_worker.py"), "--", str(tmp_path), str(nodes),
           str(devices), str(mp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-3000:]
    send = replicated_send(4, mp)
    want = plain_exchange(Tensor(send), mp).asnumpy()
    for rank in range(4):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(saved["received"][0], want[rank])
        assert tuple(saved["sent"]) == (1, 2, E_LOC, C // mp, H)
