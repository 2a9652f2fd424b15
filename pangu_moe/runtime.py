"""The only place that sets the MindSpore context or reads the environment."""
import mindspore as ms

from pangu_moe.config import MULTI_PROCESS_BACKENDS, ConfigError


def setup(runtime_cfg, parallel_cfg=None):
    """Set the device and the global seed (weights, routing tables, stateful random ops); on a
    multi-process backend also join the communication world started by msrun.

    The context stays PyNative; `runtime.mode = graph` compiles the train and eval steps with
    `ms.jit`, which is how MindSpore runs one graph per step without a global GRAPH_MODE.

    Returns: this process's world rank (0 on single-process backends).
    """
    try:
        ms.set_device(runtime_cfg.device)
    except RuntimeError as e:  # MindSpore names the targets this build supports: "... only supports one of the [...]"
        found = str(e).split("supports one of the ")[-1].split(".")[0] if "supports one of" in str(e) else "?"
        raise ConfigError(f"runtime.device = {runtime_cfg.device}: this MindSpore build cannot use it (it supports "
                          f"{found}); run on a machine with the Ascend build of MindSpore and CANN, or use "
                          f"--set runtime.device=CPU") from None
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(runtime_cfg.seed)
    if parallel_cfg is None or parallel_cfg.dispatch not in MULTI_PROCESS_BACKENDS:
        return 0
    if runtime_cfg.kernels == "custom" and runtime_cfg.device == "CPU":
        from pangu_moe.ops.build import set_threads
        set_threads(1)  # the msrun workers already fill the cores; more threads only contend
    from mindspore.communication import get_group_size, get_rank, init
    world = parallel_cfg.nodes * parallel_cfg.devices_per_node
    try:
        init()
    except RuntimeError as e:
        reason = " ".join(str(e).split()).split(", which")[0][:160]
        raise ConfigError(f"parallel.dispatch = {parallel_cfg.dispatch}: could not join the msrun world ({reason}); "
                          f"launch with run_scripts/run_msrun_cpu.sh or run_ascend_cluster.sh") from None
    if get_group_size() != world:
        raise ConfigError(f"parallel.nodes x parallel.devices_per_node = {world}: msrun started "
                          f"{get_group_size()} workers; they must match")
    return get_rank()
