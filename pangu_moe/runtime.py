"""The only place that sets the MindSpore context or reads the environment."""
import mindspore as ms


def setup(runtime_cfg):
    """Set the device and the global seed (weights, routing tables, stateful random ops).

    The context stays PyNative; `runtime.mode = graph` compiles the train and eval steps with
    `ms.jit`, which is how MindSpore runs one graph per step without a global GRAPH_MODE.
    """
    ms.set_device(runtime_cfg.device)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(runtime_cfg.seed)
