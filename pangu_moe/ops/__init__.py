"""MoE kernels behind a registry: reference (plain MindSpore, the specification), cpu (C++ AOT), ascend (Ascend C)."""
from pangu_moe.ops.registry import KERNEL_BACKENDS, OPS, kernel_backend, make_op, run_kernel_backend

__all__ = ["KERNEL_BACKENDS", "OPS", "kernel_backend", "make_op", "run_kernel_backend"]
