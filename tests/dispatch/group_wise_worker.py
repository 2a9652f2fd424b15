"""A worker for the group-wise exchange test, run by run_scripts/run_msrun_cpu.sh --script.

Usage: group_wise_worker.py OUT_DIR NODES DEVICES MP. Each rank runs the msrun_cpu group-wise exchange on its row of
the test's replicated send buffers (`tests.dispatch.test_group_wise.replicated_send`) and saves what it received
and the shape it passed to the all-to-all as OUT_DIR/rank{r}.npz.
"""
import os
import sys

import numpy as np
from mindspore import Tensor
from mindspore.communication import get_rank, init

from pangu_moe.dispatch.group_wise import GroupWiseExchange
from tests.dispatch.test_group_wise import replicated_send


def main(out, nodes, devices, mp):
    init()
    rank = get_rank()
    send = replicated_send(nodes * devices, mp)
    exchange = GroupWiseExchange("msrun_cpu", rank, nodes, devices, mp)
    sent = []
    all_to_all = exchange.ep.construct
    exchange.ep.construct = lambda x: (sent.append(x.shape), all_to_all(x))[1]
    received = exchange(Tensor(send[rank:rank + 1])).asnumpy()
    np.savez(os.path.join(out, f"rank{rank}.npz"), received=received, sent=np.asarray(sent[0]))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
