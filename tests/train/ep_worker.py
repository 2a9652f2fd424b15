"""A worker for the expert-parallel equivalence test, run by run_scripts/run_msrun_cpu.sh --script.

Usage: ep_worker.py CONFIG OUT_DIR [--set K=V ...]. Each rank saves its gradients of the step-0 batch
(reduced as the train step reduces them) to OUT_DIR/grads_rank{r}.npz, then trains into OUT_DIR.
`first_gradients` is also what the test runs in one process for the local and simulated backends.
"""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.config import RunConfig
from pangu_moe.train.steps import make_gradient
from pangu_moe.train.trainer import Trainer


def first_gradients(trainer):
    """{parameter name: gradient (numpy)} of the step-0 batch, for this process's rows and parameters."""
    params = trainer.optimizer.parameters
    gradient = ms.jit(make_gradient(trainer.model, params, trainer.capacity, trainer.data_parallel))
    batch = next(trainer.batches(0))
    grads = gradient(*(Tensor(a) for a in batch))[5]
    return {p.name: g.asnumpy() for p, g in zip(params, grads)}


def main(argv):
    config, out, overrides = argv[0], argv[1], [a for a in argv[2:] if a != "--set"]
    trainer = Trainer(RunConfig.from_yaml(config, overrides), out, log=print)
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"grads_rank{trainer.rank}.npz"), **first_gradients(trainer))
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
